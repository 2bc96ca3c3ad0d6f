"""The privacy label of a LoRA file: its ``smplora.*`` keys and kohya's training keys, as text.

Pure Python (safetensors header only); no ComfyUI import, so it is testable anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from smplora_plugin.errors import SmploraError

NO_INFO = "no privacy information"
# kohya sd-scripts' training keys worth showing next to the privacy settings.
KOHYA_KEYS = ("ss_training_started_at", "ss_base_model_version", "ss_network_module", "ss_network_dim",
              "ss_network_alpha", "ss_num_train_images", "ss_max_train_steps", "ss_epoch", "ss_learning_rate",
              "ss_resolution", "ss_output_name")


def read_header(path: Union[str, "os.PathLike[str]"]) -> Dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file (empty if it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SmploraError(f"{path} does not exist: pick a file from ComfyUI's models/loras folder.")
    if path.suffix != ".safetensors":
        raise SmploraError(f"{path.name} is not a .safetensors file; only safetensors LoRA files are read "
                           "(never pickles).")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise SmploraError(f"{path.name} is not a readable .safetensors file ({exc}).") from exc


def label_info(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Structured label: ``defended`` (bool), ``method``, ``config``, ``metrics``, ``data``, ``kohya``."""
    header = read_header(path)
    info: Dict[str, Any] = {"file": Path(path).name, "defended": "smplora.method" in header,
                            "method": header.get("smplora.method"), "version": header.get("smplora.version")}
    for key in ("config", "metrics", "data"):
        raw = header.get(f"smplora.{key}")
        info[key] = _json(raw) if raw is not None else None
    info["kohya"] = {k: header[k] for k in KOHYA_KEYS if k in header}
    info["other_smplora"] = {k: v for k, v in header.items() if k.startswith("smplora.")
                             and k not in ("smplora.method", "smplora.version", "smplora.config", "smplora.metrics",
                                           "smplora.data")}
    return info


def dp_line(dp: Dict[str, Any]) -> str:
    """The ``smplora.dp`` entry in words: epsilon at delta with the sampling the accountant assumes."""
    try:
        head = (f"DP noise ({dp.get('objective', 'dp-sgd')}): epsilon {float(dp['epsilon']):.4g} at delta "
                f"{float(dp['delta']):.3g} after {dp.get('steps')} steps, sigma {dp.get('sigma')}, "
                f"clip {dp.get('clip')} ({dp.get('accountant')} accountant; "
                f"{dp.get('assumption') or dp.get('sampling')})")
    except (KeyError, TypeError, ValueError):
        return f"smplora.dp: {json.dumps(dp, sort_keys=True)} (not in the format this version writes)"
    return head + (f". {dp['caveat']}" if dp.get("caveat") else ".")


def privacy_label(path: Union[str, "os.PathLike[str]"]) -> str:
    """A short human-readable label for a LoRA file (see :func:`label_info`)."""
    info = label_info(path)
    lines = [f"LoRA: {info['file']}"]
    if info["defended"]:
        lines.append(f"trained with the membership-inference defense: {info['method']}"
                     + (f" (smplora-plugin {info['version']})" if info["version"] else ""))
        cfg = info["config"] or {}
        if cfg:
            keys = ("objective", "alpha", "calibrated", "privacy_fraction", "k_steps", "attacker_lr", "nonmember_every",
                    "feature_grid")
            lines.append("settings: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))
        metrics = info["metrics"] or {}
        if metrics:
            lines.append("metrics at the end of training: " + ", ".join(
                f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())))
        if info["data"]:
            lines.append("data: " + ", ".join(f"{k}={v}" for k, v in sorted(info["data"].items())))
        dp = _json(info["other_smplora"].get("smplora.dp", "null"))
        for key, value in sorted(info["other_smplora"].items()):
            if key != "smplora.dp":
                lines.append(f"{key}: {value}")
        if isinstance(dp, dict):
            lines.append(dp_line(dp))
        if info["method"] == "dp-sgd":
            lines.append("Measure what the LoRA leaks with Audit LoRA (or `smplora audit`).")
        else:
            lines.append("The SMP-LoRA term is an empirical defense, not a differential-privacy guarantee: "
                         "measure it with Audit LoRA (or `smplora audit`).")
    else:
        lines.append(f"{NO_INFO}: no smplora.* keys in this file, so it was not trained with the SMP-LoRA defense "
                     "(or its metadata was stripped).")
    if info["kohya"]:
        lines.append("kohya training keys: " + ", ".join(f"{k}={v}" for k, v in info["kohya"].items()))
    return "\n".join(lines)


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
