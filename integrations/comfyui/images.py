"""Image folders for the Audit LoRA node: listing, checks (before anything runs) and loading."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from smplora_plugin.errors import InputError
from smplora_plugin.holdout import check_disjoint
from smplora_plugin.integrations._common import IMAGE_EXTENSIONS
from smplora_plugin.integrations._common import list_images as _image_files

# run_audit splits each set in half (calibration / evaluation) and needs 4 per side in each half.
MIN_IMAGES = 8


class FolderError(InputError):
    """A member / non-member folder the audit cannot use; the message names the fix."""


def list_images(folder: str, what: str, minimum: int = MIN_IMAGES) -> List[Path]:
    """Sorted image files of ``folder``; errors for a missing, empty or too small folder."""
    if not str(folder).strip():
        raise FolderError(f"the {what} folder is empty: give the path of a folder of images.")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FolderError(f"the {what} folder {path} does not exist: give the path of a folder of images.")
    files = _image_files(path, recursive=False)
    if len(files) < minimum:
        raise FolderError(f"the {what} folder {path} has {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); "
                          f"the audit needs at least {minimum} (half calibrate the attacks, half evaluate them). "
                          "Add images.")
    return files


def member_nonmember_files(members: str, nonmembers: str, minimum: int = MIN_IMAGES) -> Tuple[List[Path], List[Path]]:
    """Both folders' images, checked: enough of each, different folders, no byte-identical file in both."""
    m = list_images(members, "member", minimum)
    n = list_images(nonmembers, "non-member", minimum)
    if Path(members).expanduser().resolve() == Path(nonmembers).expanduser().resolve():
        raise FolderError("the member and non-member folders are the same folder: non-members must be images the "
                          "LoRA was never trained on, in a folder of their own.")
    try:
        check_disjoint(m, n, train_name="member", holdout_name="non-member")
    except ValueError as exc:
        raise FolderError(str(exc)) from exc
    return m, n


def load_images(paths: List[Path], size: int, default_caption: str) -> Tuple[torch.Tensor, List[str]]:
    """RGB images resized to ``size`` x ``size``, ``(N, 3, size, size)`` in [-1, 1], and captions.

    A caption is read from ``<image stem>.txt`` or ``.caption`` beside the image, else
    ``default_caption`` is used.
    """
    from PIL import Image

    arrays, captions = [], []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        captions.append(_caption(p) or default_caption)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, captions


def _caption(path: Path) -> Optional[str]:
    for ext in (".txt", ".caption"):
        c = path.with_suffix(ext)
        if c.is_file():
            return c.read_text(encoding="utf-8").strip()
    return None
