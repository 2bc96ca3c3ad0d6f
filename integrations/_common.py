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


def verify_images(files: Iterable[PathLike]) -> None:
    """Open and decode every held-out image; refuse the unreadable ones (``HoldoutError``, naming up to five)."""
    from PIL import Image

    from smplora_plugin.errors import HoldoutError

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data; OSError for permissions
            bad.append(f"{f} ({type(exc).__name__}: {exc})")
    if bad:
        shown = "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise HoldoutError(f"{len(bad)} holdout image(s) cannot be read: {shown}. Fix their permissions, "
                           "re-export them or remove them from the holdout folder.")
