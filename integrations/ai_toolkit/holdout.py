"""Members and non-members of an ai-toolkit run: the image lists, the overlap check, the manifest, the held-out draws.

- :func:`dataset_images`: the images of the process's ``datasets:`` (members; ``is_reg`` datasets are
  regularisation images, never members), listed as ai-toolkit lists them (a folder walked without hidden
  folders and ``_controls``, or a JSON caption file's keys);
- :func:`check_holdout`: the holdout folder's images, refused when empty or byte-identical to any training or
  regularisation image (before ai-toolkit writes anything);
- :func:`holdout_dataset` / :class:`NonmemberPool`: the held-out images as one more ai-toolkit dataset with the
  first training dataset's options (resolution, captions, caching, buckets), drawn in a seeded, resumable order;
- :func:`forked_rng` / :func:`restored_rng`: extra forwards that leave the trainer's random streams untouched.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from smplora_plugin._rng import restored_rng, rng_restore, rng_snapshot  # noqa: F401 (the shim's names)
from smplora_plugin.errors import HoldoutError
from smplora_plugin.holdout import check_disjoint, write_manifest
from smplora_plugin.integrations._common import IMAGE_EXTENSIONS
from smplora_plugin.integrations._common import verify_images as _verify_images

# keys of a training dataset that do not carry over to the held-out one
_DATASET_SKIP = ("folder_path", "dataset_path", "is_reg", "num_repeats", "batch_size", "control_path",
                 "clip_image_path", "mask_path", "unconditional_path", "inpaint_path")


def walk_images(folder: Path, extensions: Iterable[str]) -> List[Path]:
    """Image files under ``folder``, sorted, as ai-toolkit's dataset finds them: hidden folders and files and
    ``_controls`` folders skipped, extensions matched case-insensitively."""
    exts = tuple(e.lower() for e in extensions)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if os.path.basename(root) == "_controls":
            continue
        out += [Path(root) / f for f in files if f.lower().endswith(exts) and not f.startswith(".")]
    return sorted(out)


def dataset_images(datasets: Any, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Tuple[List[Path], List[Path]]:
    """(member images, regularisation images) of a process's raw ``datasets:`` list."""
    members: List[Path] = []
    regs: List[Path] = []
    for i, ds in enumerate(datasets or []):
        if not isinstance(ds, Mapping):
            continue
        source = ds.get("dataset_path") or ds.get("folder_path")
        if not source:
            continue
        path = Path(str(source)).expanduser()
        if path.is_dir():
            files = walk_images(path, extensions)
        elif path.is_file():
            try:
                files = [Path(k) for k in json.loads(path.read_text(encoding="utf-8"))]
            except (OSError, ValueError, TypeError) as exc:
                raise HoldoutError(f"datasets[{i}]: {path} is neither a folder nor a JSON caption file ({exc}); the "
                                   "holdout cannot be checked against it.") from exc
        else:
            raise HoldoutError(f"datasets[{i}].folder_path {path} does not exist; the holdout cannot be checked "
                               "against it.")
        (regs if ds.get("is_reg") else members).extend(files)
    return sorted(set(members)), sorted(set(regs))


def check_holdout(folder: Path, datasets: Any, extensions: Iterable[str] = IMAGE_EXTENSIONS
                  ) -> Dict[str, List[Path]]:
    """The splits (``member``, ``nonmember``, ``regularization``) after checking the holdout folder: it has images,
    they all open, and none is byte-identical to a training or regularisation image. Raises :class:`HoldoutError`."""
    extensions = tuple(extensions)
    holdout = walk_images(folder, extensions)
    if not holdout:
        raise HoldoutError(f"privacy.holdout_folder {folder} holds no images ({', '.join(extensions)}); put held-out "
                           "images of the training domain there (never trained on).")
    members, regs = dataset_images(datasets, extensions)
    if not members:
        raise HoldoutError("the process has no training images (datasets: with folder_path and no is_reg); SMP-LoRA "
                           "needs members to train the proxy attacker on.")
    _verify_images(holdout)
    check_disjoint([*members, *regs], holdout, train_name="training/regularisation",
                   holdout_name=f"holdout ({folder})")
    splits = {"member": members, "nonmember": holdout}
    if regs:
        splits["regularization"] = regs
    return splits


def record(manifest: Path, splits: Mapping[str, Sequence[Path]], *, seed: int, source: str) -> Path:
    """Write the member / non-member manifest: every file with its SHA-256, by set."""
    return write_manifest(manifest, {k: [str(p) for p in v] for k, v in splits.items()}, seed=seed,
                          extra={"source": source, "trainer": "ai-toolkit"})


def holdout_dataset(datasets: Any, folder: Path) -> Dict[str, Any]:
    """The raw ai-toolkit dataset config of the held-out images: the first training dataset's options
    (resolution, captions, caching, buckets, augmentations) with the holdout folder, once, never a regulariser."""
    first = next((d for d in (datasets or []) if isinstance(d, Mapping) and not d.get("is_reg")), None)
    if first is None:
        raise HoldoutError("the process has no training dataset (datasets: without is_reg) to take the held-out "
                           "images' options from.")
    out = {k: v for k, v in first.items() if k not in _DATASET_SKIP}
    out.update(folder_path=str(folder), is_reg=False, num_repeats=1)
    return out


class NonmemberPool:
    """Seeded, resumable draws of held-out batches from an ai-toolkit data loader (never iterated, so it starts
    no worker process): draw ``c`` is a fixed function of the seed and ``c``.

    With buckets (the loader batches nothing, ``batch_size`` is None) each dataset item is a ready list of
    file items and draw ``c`` is item ``perm_k[c mod n]``, ``perm_k`` a fresh seeded permutation for each
    pass ``k``; without buckets draw ``c`` takes the next ``batch_size`` items of the same seeded sequence.
    Items are collated with the loader's own ``collate_fn``.
    """

    def __init__(self, loader: Any, seed: int):
        self.dataset = loader.dataset
        self.collate: Callable[[List[Any]], Any] = loader.collate_fn
        self.batch_size: Optional[int] = loader.batch_size
        self.seed = int(seed)
        self.n = len(self.dataset)
        if self.n == 0:
            raise HoldoutError("the held-out dataset is empty (no image reached ai-toolkit's dataset); check "
                               "privacy.holdout_folder and the dataset's resolution.")
        self._perm: Tuple[int, List[int]] = (-1, [])

    def _index(self, slot: int) -> int:
        k, pos = divmod(slot, self.n)
        if self._perm[0] != k:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            self._perm = (k, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][pos]

    def batch(self, draw: int) -> Any:
        """The held-out batch of draw ``draw`` (run it inside :func:`forked_rng` for reproducible augmentations)."""
        if self.batch_size is None:
            items = self.dataset[self._index(draw)]
            return self.collate(list(items))
        size = int(self.batch_size)
        return self.collate([self.dataset[self._index(draw * size + j)] for j in range(size)])


@contextmanager
def forked_rng(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block with every stream seeded from ``seed``; the trainer's streams are put back afterwards."""
    import numpy as np

    with restored_rng(device):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.manual_seed(seed)
        yield
