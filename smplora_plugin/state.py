"""Serialise a PrivacyRegularizer to a flat dict of tensors + JSON strings, saved with safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Union

import torch

from ._io import atomic_write
from .attacker import ProxyAttacker, attacker_optimizer
from .config import PrivacyConfig
from .errors import ConfigError, StateError

if TYPE_CHECKING:  # pragma: no cover
    from .regularizer import PrivacyRegularizer

FORMAT = "smplora-state/1"
PathLike = Union[str, "os.PathLike[str]"]


def regularizer_state(reg: "PrivacyRegularizer") -> Dict[str, Any]:
    """Flat state: tensors (``attacker.*``, ``optimizer.*``, ``rng.*``) and JSON strings (``meta.*``)."""
    sd: Dict[str, Any] = {
        "meta.format": FORMAT,
        "meta.config": reg.config.to_json(),
        "meta.counters": json.dumps({"global_step": reg.global_step, "attacker_updates": reg.attacker_updates,
                                     "attacker_steps": reg.attacker_steps}),
        "meta.last": json.dumps({k: float(v) for k, v in reg._last.items()}, sort_keys=True),
        "meta.attacker": json.dumps(None),
        "meta.input_grid": json.dumps(None if reg.input_grid is None else list(reg.input_grid)),
    }
    if reg.attacker is None:
        return sd
    sd["meta.attacker"] = json.dumps({"in_features": reg.attacker.in_features, "device": str(reg._device)})
    for name, tensor in reg.attacker.state_dict().items():
        sd[f"attacker.{name}"] = tensor.detach().cpu().clone()
    osd = reg.optimizer.state_dict()
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                sd[f"optimizer.{idx}.{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    sd["meta.optimizer"] = json.dumps({"param_groups": osd["param_groups"], "scalars": scalars,
                                       "indices": sorted(int(i) for i in osd["state"])})
    sd["rng.attacker"] = reg._generator.get_state().clone()
    if reg._bank is not None:
        sd["bank.nonmember"] = reg._bank.detach().cpu().clone()
    return sd


def config_from_state(state: Dict[str, Any], source: Any = "state") -> PrivacyConfig:
    _check_format(state, source)
    try:
        return PrivacyConfig.from_dict(json.loads(state["meta.config"]))
    except (ValueError, ConfigError, KeyError) as exc:
        raise StateError(f"{source} holds an invalid config ({exc}); re-save it with reg.save().") from exc


def load_regularizer_state(reg: "PrivacyRegularizer", state: Dict[str, Any]) -> None:
    """Validate ``state`` whole, then restore it into ``reg``."""
    saved_cfg = config_from_state(state)
    mine, theirs = reg.config.algorithm_fields(), saved_cfg.algorithm_fields()
    diff = sorted(k for k in mine if mine[k] != theirs[k])
    if diff:
        details = ", ".join(f"{k}: saved {theirs[k]!r} vs this {mine[k]!r}" for k in diff)
        raise StateError(
            f"the state was saved with a different config ({details}). Load it with PrivacyRegularizer.load(path) "
            "to get the saved config, or construct the regulariser with the same settings."
        )
    try:
        counters = json.loads(state["meta.counters"])
        last = json.loads(state.get("meta.last", "{}"))
        info = json.loads(state["meta.attacker"])
        counters = {k: int(counters[k]) for k in ("global_step", "attacker_updates", "attacker_steps")}
    except (KeyError, ValueError, TypeError) as exc:
        raise StateError(f"state is missing or has corrupt counters ({exc}); re-save it with reg.save().") from exc
    input_grid = _input_grid(state.get("meta.input_grid", "null"))
    if info is not None and input_grid is not None and int(info["in_features"]) % (input_grid[0] * input_grid[1]):
        raise StateError(f"the state's input grid {input_grid} does not divide its attacker input size "
                         f"{info['in_features']}; the file is corrupt.")

    attacker = optimizer = generator = None
    if info is not None:
        cfg = reg.config
        in_features = int(info["in_features"])
        device = torch.device(cfg.device) if cfg.device is not None else _usable(info.get("device", "cpu"))
        attacker = ProxyAttacker(in_features, cfg.hidden, cfg.dropout, seed=cfg.seed)
        expected = attacker.state_dict()
        got = {k[len("attacker."):]: v for k, v in state.items() if k.startswith("attacker.")}
        if set(got) != set(expected) or any(got[k].shape != expected[k].shape for k in expected):
            raise StateError("the attacker weights in the state do not match the configured architecture "
                             f"(hidden={cfg.hidden}, in_features={in_features}); the file is corrupt or from another version.")
        if any(v.dtype != torch.float32 for v in got.values()):
            dtypes = sorted({str(v.dtype).replace("torch.", "") for v in got.values()})
            raise StateError(f"the attacker weights in the state are {', '.join(dtypes)}, but states are saved in fp32 "
                             "(whatever the training precision): the file was converted after saving; resume from "
                             "the file as saved.")
        attacker.load_state_dict(got)
        attacker.to(device)
        optimizer = attacker_optimizer(attacker, cfg.attacker_lr, cfg.attacker_weight_decay)
        try:
            meta = json.loads(state["meta.optimizer"])
            opt_state = {}
            for idx in meta["indices"]:
                entry = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"optimizer.{idx}.")}
                entry.update(meta["scalars"].get(str(idx), {}))
                opt_state[int(idx)] = entry
            optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise StateError(f"the attacker optimiser state is corrupt ({exc}); re-save it with reg.save().") from exc
        rng = state.get("rng.attacker")
        generator = torch.Generator(device=device)
        try:
            generator.set_state(rng)
        except (TypeError, RuntimeError) as exc:
            raise StateError(f"the attacker RNG state is missing or corrupt ({exc}).") from exc

    bank = state.get("bank.nonmember")
    if bank is not None and (attacker is None or bank.ndim != 2 or bank.shape[1] != attacker.in_features):
        raise StateError("the non-member bank in the state does not match the attacker's input size; the file is corrupt.")
    reg.attacker, reg.optimizer, reg._generator = attacker, optimizer, generator
    reg.input_grid = input_grid
    reg._bank = None if bank is None else bank.float().to(reg._device)
    reg.global_step = counters["global_step"]
    reg.attacker_updates = counters["attacker_updates"]
    reg.attacker_steps = counters["attacker_steps"]
    device = reg._device if attacker is not None else torch.device("cpu")
    reg._last = {k: torch.tensor(float(v), dtype=torch.float32, device=device) for k, v in last.items()}


def _input_grid(raw: Any):
    """The ``meta.input_grid`` entry: ``None`` or an ``(h, w)`` pair of positive ints."""
    try:
        value = json.loads(raw)
        if value is None:
            return None
        h, w = (int(v) for v in value)
        if h > 0 and w > 0 and list(value) == [h, w]:
            return (h, w)
    except (TypeError, ValueError):
        pass
    raise StateError(f"the state's input grid {raw!r} is corrupt (expected null or [h, w]); re-save it with reg.save().")


def save_state(state: Dict[str, Any], path: PathLike) -> Path:
    """Write a state dict as ``.safetensors`` (tensors + ``meta.*`` strings in the header), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if not all(isinstance(v, str) for v in metadata.values()):
        raise StateError("state values must be tensors or strings.")
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_state(path: PathLike) -> Dict[str, Any]:
    """Read a state file written by :func:`save_state` (no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            state: Dict[str, Any] = dict(f.metadata() or {})
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as exc:
        raise StateError(f"{path} is not a readable smplora state file ({exc}); it is corrupt or not a "
                         ".safetensors file written by reg.save().") from exc
    _check_format(state, path)
    return state


def _check_format(state: Dict[str, Any], source: Any) -> None:
    if not isinstance(state, dict) or state.get("meta.format") != FORMAT:
        raise StateError(f"{source} is not a smplora regulariser state (expected meta.format={FORMAT!r}).")


def _usable(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return dev
