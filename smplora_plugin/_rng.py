"""The trainer's global random streams, taken and put back around the shims' extra forwards (a held-out batch,
the base prediction), so that they leave the trainer's noise, timesteps and augmentations as they were."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional

import torch


def rng_snapshot(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The global streams: torch CPU (and ``device``'s, CUDA or MPS), Python, NumPy; for :func:`rng_restore`."""
    import numpy as np

    snap: Dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device is not None and torch.device(device).type == "cuda":
        snap["cuda"] = (torch.device(device), torch.cuda.get_rng_state(device))
    elif device is not None and torch.device(device).type == "mps":
        snap["mps"] = torch.mps.get_rng_state()
    return snap


def rng_restore(snap: Mapping[str, Any]) -> None:
    """Put the streams of :func:`rng_snapshot` back."""
    import numpy as np

    torch.set_rng_state(snap["cpu"])
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    if "cuda" in snap:
        device, state = snap["cuda"]
        torch.cuda.set_rng_state(state, device)
    if "mps" in snap:
        torch.mps.set_rng_state(snap["mps"])


@contextmanager
def restored_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block and put the streams back afterwards (also when it raises)."""
    snap = rng_snapshot(device)
    try:
        yield
    finally:
        rng_restore(snap)
