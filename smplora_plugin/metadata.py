"""Write and read ``smplora.*`` keys in the header of an existing ``.safetensors`` file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ._io import atomic_write
from .errors import SmploraError

PREFIX = "smplora."
PathLike = Union[str, "os.PathLike[str]"]


def _read(path: Path):
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return header, tensors


def read_privacy_metadata(path: PathLike) -> Dict[str, str]:
    """The ``smplora.*`` entries of a ``.safetensors`` header (empty if none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SmploraError(f"{path} does not exist or is not a file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise SmploraError(f"{path} is not a readable .safetensors file ({exc}).") from exc
    return {k: v for k, v in header.items() if k.startswith(PREFIX)}


def build_privacy_metadata(config: Any = None, metrics: Optional[Mapping[str, Any]] = None,
                           extra: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """``smplora.*`` header entries from a config (``PrivacyConfig`` or dict), metrics and extras."""
    from . import __version__

    out: Dict[str, str] = {"smplora.version": __version__}
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        out["smplora.method"] = "mp-lora" if cfg.get("objective") == "mp" else "smp-lora"
        out["smplora.config"] = json.dumps(cfg, sort_keys=True)
    if metrics is not None:
        out["smplora.metrics"] = json.dumps(dict(metrics), sort_keys=True)
    for key, value in (extra or {}).items():
        out[key] = value
    return validate_entries(out)


def validate_entries(entries: Mapping[str, Any]) -> Dict[str, str]:
    """Check that every key is in the ``smplora.`` namespace and every value a str."""
    out = {}
    for key, value in entries.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            raise SmploraError(
                f"metadata key {key!r} is outside the smplora.* namespace; kohya's ss_* keys and diffusers' "
                "lora_adapter_metadata must never be written by this plugin. Prefix your key with 'smplora.'."
            )
        if not isinstance(value, str):
            value = json.dumps(value, sort_keys=True)
        out[key] = value
    return out


def annotate(lora_path: PathLike, config: Any = None, metrics: Optional[Mapping[str, Any]] = None,
             extra: Optional[Mapping[str, Any]] = None, *,
             entries: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Add the privacy config and metrics to an existing LoRA ``.safetensors`` header.

    Every existing header key and tensor is kept; only ``smplora.*`` keys are added or
    replaced. The file is rewritten through a temporary file in the same folder and an atomic
    ``os.replace``; on any error the original is left untouched. Returns the entries written.
    ``entries`` (already-built ``smplora.*`` entries, e.g. ``reg.file_metadata()``) is merged
    over the ones built from ``config``/``metrics``/``extra``.
    """
    path = Path(lora_path)
    new = build_privacy_metadata(config, metrics, extra)
    if entries:
        new.update(validate_entries(entries))
    if not path.is_file():
        raise SmploraError(f"cannot annotate {path}: no such file. Pass the path of the saved LoRA .safetensors file.")
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise SmploraError(f"cannot annotate {path}: the file or its folder is not writable.")
    try:
        header, tensors = _read(path)
    except Exception as exc:
        raise SmploraError(f"cannot annotate {path}: it is not a readable .safetensors file ({exc}). "
                           "The file was not changed.") from exc
    merged = dict(header)
    merged.update(new)
    from safetensors.torch import save_file

    def verify(tmp: str) -> None:
        check_header, check_tensors = _read(Path(tmp))
        if check_header != merged or set(check_tensors) != set(tensors):
            raise SmploraError(f"verification of the rewritten copy of {path} failed; the file was not changed.")

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=merged), mode=os.stat(path).st_mode & 0o7777,
                 verify=verify)
    return new
