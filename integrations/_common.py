"""Helpers any trainer shim may share: wrapper peeling, image folders and the start-up summary box.

They move nothing of the algorithm (that is the core's, :mod:`smplora_plugin`) and import no trainer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Union

import torch

from smplora_plugin._io import IMAGE_EXTENSIONS
from smplora_plugin.integrations.summary import BOX_WIDTH, summary_box

__all__ = ["IMAGE_EXTENSIONS", "list_images", "unwrap", "summary_box", "BOX_WIDTH"]

PathLike = Union[str, "os.PathLike[str]"]
_MAX_WRAPPERS = 8   # DDP / DataParallel / DeepSpeed (.module) and torch.compile (._orig_mod) layers peeled at most


def list_images(folder: PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS, *, recursive: bool = True
                ) -> List[Path]:
    """The image files of ``folder``, sorted, matched by extension (case-insensitively); with ``recursive``
    (the default) those of its subfolders too."""
    folder = Path(folder)
    exts = tuple(e.lower() for e in extensions)
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in entries if p.is_file() and p.suffix.lower() in exts)


def unwrap(model: Any, accelerator: Any = None, until: Optional[Callable[[Any], bool]] = None) -> Any:
    """``model`` under its wrappers: ``accelerator.unwrap_model(model)`` when an accelerator is given, then
    DDP / DataParallel / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) layers peeled off
    until ``until(model)`` holds (or no wrapper is left)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    for _ in range(_MAX_WRAPPERS):
        if until is not None and until(model):
            break
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model
