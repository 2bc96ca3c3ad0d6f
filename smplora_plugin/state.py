"""Safetensors codec of regulariser states: a flat state dict <-> a ``.safetensors`` file or its bytes.

A state dict (:meth:`PrivacyRegularizer.state_dict`) maps names to tensors, stored as the file's tensors, and to
strings, stored in its header's metadata. This module knows nothing of what the names mean beyond the one
entry that marks a regulariser state (``meta.format``, ``smplora-state/<version>``); the regulariser checks
the contents (version, config, shapes) when it loads them. No pickle is ever read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from ._io import atomic_write
from .config import PrivacyConfig
from .errors import StateError

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, Union[torch.Tensor, str]]

#: ``meta.format`` of every regulariser state starts with this; the version after it is the regulariser's.
FORMAT_PREFIX = "smplora-state/"


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """The ``.safetensors`` bytes of a state dict: tensors as tensors, strings as header metadata."""
    from safetensors.torch import save

    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, (torch.Tensor, str)))
    if bad:
        raise StateError(f"state entries {bad} are neither tensors nor strings: a state file holds tensors and "
                         "strings only (encode other values as JSON strings).")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {k: v for k, v in state.items() if isinstance(v, str)}
    return save(tensors, metadata=metadata)


def state_from_bytes(data: bytes, source: Any = "state") -> StateDict:
    """The state dict of :func:`state_to_bytes` output; refuses bytes that are not a regulariser state."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        state: StateDict = {**load(bytes(data)), **metadata}
        if not all(isinstance(v, str) for v in metadata.values()):
            raise StateError("header metadata values must be strings")
    except Exception as exc:   # safetensors raises its own error types on malformed input
        raise StateError(f"{source} is not a readable smplora state file ({exc}); it is corrupt or not a "
                         ".safetensors file written by reg.save().") from exc
    fmt = state.get("meta.format")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise StateError(f"{source} is not a smplora regulariser state (its header has no meta.format "
                         f"{FORMAT_PREFIX}<version>); pass the file written by reg.save().")
    return state


def save_state(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write a state dict to a ``.safetensors`` file, atomically (encoded first: a refused state writes nothing)."""
    data = state_to_bytes(state)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def read_state(path: PathLike) -> StateDict:
    """Read a state file written by :func:`save_state`."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file {path} does not exist.")
    return state_from_bytes(path.read_bytes(), path)


def config_from_state(state: Mapping[str, Any], source: Any = "state") -> PrivacyConfig:
    """The config a state was saved with (:func:`smplora_plugin.regularizer.saved_config`)."""
    from .regularizer import saved_config

    return saved_config(state, source)
