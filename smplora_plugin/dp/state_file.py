"""A DP run's state as a safetensors file: ``dp.meta`` (JSON: settings, steps, accountant history) in the
header, ``dp.rng`` (the noise generator's state) as a tensor. Every trainer shim saves and reads it here; what
it holds is checked against the run by ``DPGradients.load_state_dict`` / ``DPTraining.load_state_dict``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from .errors import DPError

PathLike = Union[str, "os.PathLike[str]"]


def save_dp_state(dp: Any, path: PathLike) -> Path:
    """``dp.state_dict()`` (a ``DPGradients`` or ``DPTraining``) to ``path``, atomically; encoded first, so a
    state that cannot be taken (samples accumulated but not stepped) writes nothing."""
    from .._io import atomic_write
    from ..state import state_to_bytes

    data = state_to_bytes(dp.state_dict())
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def read_dp_state(path: PathLike, remedy: str = "Move the file away, or start a new run.") -> Dict[str, Any]:
    """The state :func:`save_dp_state` wrote. A damaged file, or one that is not a DP state, raises ``DPError``
    naming the file and ``remedy`` (what the user of that trainer can do)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state: Dict[str, Any] = dict(f.metadata() or {})
            state.update({key: f.get_tensor(key) for key in f.keys()})
        if "dp.rng" not in state:
            raise ValueError("no dp.rng tensor")
        meta = json.loads(state["dp.meta"])
        if not isinstance(meta, dict) or not isinstance(meta.get("accountant"), dict):
            raise ValueError("dp.meta holds no accountant record")
    except Exception as exc:  # noqa: BLE001 - safetensors / json raise their own types on a damaged file
        raise DPError(f"{path} is not a readable DP state ({exc}); it is damaged or was not written by a DP run. "
                      f"{remedy}") from exc
    return state
