"""Held-out (non-member) image folders for the diffusers scripts: captions, checks and seeded batches."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from smplora_plugin.errors import HoldoutError, StateError
from smplora_plugin.holdout import check_disjoint
from smplora_plugin.integrations._common import IMAGE_EXTENSIONS, list_images
from smplora_plugin.integrations._common import verify_images as _verify_images

from .args import option, privacy_config_from_args, privacy_seed

PathLike = Union[str, "os.PathLike[str]"]


def _read_captions(folder: Path, files: Sequence[Path], caption_column: str) -> List[str]:
    """Captions from ``metadata.jsonl`` (``file_name`` + caption column) or sidecar ``.txt`` / ``.caption`` files."""
    by_name: Dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
            for line in lines:
                if not line.strip():
                    continue
                row = json.loads(line)
                if "file_name" in row and caption_column in row:
                    value = row[caption_column]
                    by_name[os.path.normpath(row["file_name"])] = value if isinstance(value, str) else value[0]
        except (OSError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise HoldoutError(f"{meta} is not valid JSON lines with 'file_name' and {caption_column!r} "
                               f"({exc}); fix or remove it.") from exc
    captions = []
    for f in files:
        rel = os.path.normpath(os.path.relpath(f, folder))
        if rel in by_name:
            captions.append(by_name[rel])
            continue
        for ext in (".txt", ".caption"):
            side = f.with_suffix(ext)
            if side.is_file():
                try:
                    captions.append(side.read_text(encoding="utf-8").strip())
                except (OSError, UnicodeDecodeError) as exc:
                    raise HoldoutError(f"caption file {side} cannot be read ({exc}).") from exc
                break
        else:
            captions.append("")
    return captions


class HoldoutImages:
    """Cycling, seeded batches of held-out (non-member) images through the script's own preprocessing.

    Each draw reads ``batch_size`` images (and captions) for this process, calls the script's batched
    ``preprocess`` (Hugging Face ``datasets`` style: a dict of columns in, the dict with e.g.
    ``pixel_values`` / ``input_ids`` added out), splits the columns into rows and calls the script's
    ``collate_fn``. The order is a fresh permutation per pass, drawn from ``seed``; under multi-process
    training every process reads a disjoint slice of the same global draw (``batch_size *
    num_processes`` images), so the attacker update, which gathers features from every rank, sees the
    same non-members in the same order as a single process with the global batch.

    Every image is opened (and decoded) once on construction; an empty, missing or unreadable folder,
    or any image byte-identical to a training image, raises :class:`HoldoutError` before training.

    Args:
        folder: the held-out image folder (recursive; captions from ``metadata.jsonl`` or ``.txt`` files).
        preprocess: the script's batched preprocessing (``preprocess_train``); ``None`` keeps raw columns.
        collate_fn: the script's collate function; ``None`` returns the list of rows.
        batch_size: images per process per draw.
        seed: seeds the order.
        image_column / caption_column: column names ``preprocess`` expects.
        train_files / train_dir: the training images to check against (content hash).
        process_index / num_processes: this process's rank and the world size.
    """

    def __init__(self, folder: PathLike, *, preprocess: Optional[Callable[[Dict[str, list]], Mapping[str, Any]]] = None,
                 collate_fn: Optional[Callable[[List[Dict[str, Any]]], Any]] = None, batch_size: int = 1, seed: int = 0,
                 image_column: str = "image", caption_column: str = "text",
                 train_files: Optional[Sequence[PathLike]] = None, train_dir: Optional[PathLike] = None,
                 process_index: int = 0, num_processes: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HoldoutError(f"holdout batch_size={batch_size!r} must be a positive int.")
        if not (0 <= int(process_index) < int(num_processes)):
            raise HoldoutError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HoldoutError(f"holdout folder {self.folder} does not exist or is not a folder; pass "
                               "--privacy_holdout_dir with held-out images of the training domain.")
        files = list_images(self.folder)
        if not files:
            raise HoldoutError(f"holdout folder {self.folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}); "
                               "put held-out, never-trained-on images there.")
        _verify_images(files)
        train = [Path(p) for p in (train_files or [])]
        if train_dir is not None:
            if not Path(train_dir).is_dir():
                raise HoldoutError(f"training folder {train_dir} does not exist; cannot check the holdout against it.")
            train += list_images(train_dir)
        if train:
            check_disjoint(train, files, train_name=f"training ({train_dir or 'train_files'})",
                           holdout_name=f"holdout ({self.folder})")
        self.files = files
        self.captions = _read_captions(self.folder, files, caption_column)
        self.preprocess, self.collate_fn = preprocess, collate_fn
        self.image_column, self.caption_column = image_column, caption_column
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.process_index, self.num_processes = int(process_index), int(num_processes)
        self.train_checked = len(train)
        self.epoch = 0          # current pass over the files
        self.position = 0       # next index within the pass's permutation
        self.draws = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, preprocess: Optional[Callable] = None,
                  collate_fn: Optional[Callable] = None, accelerator: Any = None, *,
                  train_files: Optional[Sequence[PathLike]] = None, **kwargs: Any) -> Optional["HoldoutImages"]:
        """Holdout batches from ``--privacy_holdout_dir`` etc.; ``None`` for ``--privacy none``.

        Checks against the images of ``args.train_data_dir`` (and ``train_files``); uses the
        script's ``args.image_column`` / ``args.caption_column`` names when it has them.
        """
        config = privacy_config_from_args(args)
        if config is None:
            return None
        train_batch = max(1, int(option(args, "train_batch_size", 1)))
        batch = option(args, "privacy_holdout_batch_size") or config.nonmember_rows(train_batch)
        opts = dict(
            preprocess=preprocess, collate_fn=collate_fn, batch_size=int(batch), seed=privacy_seed(args),
            image_column=option(args, "image_column", "image"),
            caption_column=option(args, "privacy_holdout_caption_column") or option(args, "caption_column", "text"),
            train_files=train_files, train_dir=option(args, "train_data_dir") or option(args, "instance_data_dir"),
            process_index=accelerator.process_index if accelerator is not None else 0,
            num_processes=accelerator.num_processes if accelerator is not None else 1,
        )
        opts.update(kwargs)
        if not opts.get("train_files") and not opts.get("train_dir"):
            warnings.warn(
                "the holdout images are not checked against the training images (no --train_data_dir / "
                "--instance_data_dir, e.g. a hub dataset): pass train_files=[...] to HoldoutImages.from_args so that "
                "overlapping (byte-identical) images are refused.", UserWarning, stacklevel=2)
        return cls(args.privacy_holdout_dir, **opts)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Any]:
        return self

    def _permutation(self, epoch: int) -> List[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.files), generator=gen).tolist()

    def next_indices(self) -> List[int]:
        """Advance the cursor by one global draw; return this process's file indices."""
        need = self.batch_size * self.num_processes
        out: List[int] = []
        while len(out) < need:
            perm = self._permutation(self.epoch)
            take = perm[self.position:self.position + need - len(out)]
            out += take
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        self.draws += 1
        lo = self.process_index * self.batch_size
        return out[lo:lo + self.batch_size]

    def __next__(self) -> Any:
        from PIL import Image

        idx = self.next_indices()
        images = []
        for i in idx:
            with Image.open(self.files[i]) as im:
                im.load()
                images.append(im.copy())
        columns: Dict[str, list] = {self.image_column: images, self.caption_column: [self.captions[i] for i in idx]}
        if self.preprocess is not None:
            columns = dict(self.preprocess(columns))
        rows = [{k: v[j] for k, v in columns.items()} for j in range(len(idx))]
        return self.collate_fn(rows) if self.collate_fn is not None else rows

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "draws": self.draws, "seed": self.seed,
                "n_files": len(self.files), "batch_size": self.batch_size, "num_processes": self.num_processes}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise :class:`StateError` if ``state`` was saved for another holdout size, seed or batch layout."""
        mine = {"seed": self.seed, "n_files": len(self.files), "batch_size": self.batch_size,
                "num_processes": self.num_processes}
        try:
            diff = {k: int(state[k]) for k in mine if k in state and int(state[k]) != mine[k]}
            int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"the checkpoint's holdout cursor is corrupt ({exc}).") from exc
        if diff:
            details = ", ".join(f"{k}: saved {v} vs this run {mine[k]}" for k, v in diff.items())
            raise StateError(
                f"the checkpoint's holdout cursor does not fit this run ({details}): resume with the same "
                "--privacy_holdout_dir, --privacy_seed, holdout batch size and number of processes."
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor (validated first)."""
        self.check_state(state)
        self.epoch, self.position, self.draws = int(state["epoch"]), int(state["position"]), int(state.get("draws", 0))
