"""Does a LoRA file fit the workflow's model? Checked before the audit loads or writes anything."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from smplora_plugin.errors import InputError


def _weights_of(patch: Any) -> Any:
    if isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[0], str):
        return patch[0], patch[1]
    return type(patch).__name__, getattr(patch, "weights", None)


def shape_mismatches(loaded: Dict[Any, Any], weights: Dict[str, torch.Tensor]) -> List[str]:
    """Model keys whose LoRA patch cannot apply to the model's weight of that name (by shape)."""
    bad = []
    for key, patch in loaded.items():
        name = key[0] if isinstance(key, tuple) else key
        w = weights.get(name)
        if w is None:
            continue
        kind, parts = _weights_of(patch)
        if kind in ("diff", "set"):
            if tuple(parts[0].shape) != tuple(w.shape):
                bad.append(f"{name}: {kind} {tuple(parts[0].shape)} vs weight {tuple(w.shape)}")
        elif (isinstance(parts, (tuple, list)) and len(parts) >= 2 and torch.is_tensor(parts[0])
              and torch.is_tensor(parts[1])):
            up, down = parts[0], parts[1]
            mid = parts[3] if len(parts) > 3 else None
            if up.ndim < 2 or down.ndim < 2 or w.ndim < 2:
                continue
            fits = up.shape[0] == w.shape[0] and (mid is not None or down.flatten(1).shape[1] == w.flatten(1).shape[1])
            if not fits:
                bad.append(f"{name}: up {tuple(up.shape)} / down {tuple(down.shape)} vs weight {tuple(w.shape)}")
    return bad


def check_lora_fits(model: Any, clip: Any, lora_sd: Dict[str, torch.Tensor], name: str) -> None:
    """Raise :class:`~smplora_plugin.errors.InputError` if the LoRA matches none of the model's layers or its
    shapes do not fit."""
    import comfy.lora
    import comfy.lora_convert

    key_map: Dict[str, str] = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora_sd)), key_map, log_missing=False)
    if not loaded:
        raise InputError(f"{name} matches none of this model's layers: it was trained for another architecture. "
                         "Connect the base model the LoRA was trained on (or pick a LoRA for this model).")
    weights = dict(model.model.state_dict())
    if clip is not None:
        weights.update(clip.cond_stage_model.state_dict())
    bad = shape_mismatches(loaded, weights)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InputError(f"{name} does not fit this model's layer sizes ({'; '.join(bad[:3])}{more}): it was trained "
                         "for another model of this family. Connect the base model the LoRA was trained on.")
