"""Members and non-members through kohya's own dataset machinery.

Non-members are kohya's *validation* dataset group, which kohya never trains on and already
prepares like the training group (buckets, cached latents, captions, text-encoder caching):

- ``--validation_split F`` (or a dataset's ``validation_split``) carves images out of the
  training folders (by image, seeded, written to the manifest, announced), or
- ``--privacy_holdout_dir DIR`` (kohya's folder layout) is added as one more dataset block
  with ``validation_split = 1.0``, through a generated dataset config that kohya then reads.

Members are the training group's non-regularisation images; regularisation (class) images and
differential-output-preservation rows never reach the attacker.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from smplora_plugin._io import atomic_write
from smplora_plugin._rng import rng_restore, rng_snapshot  # noqa: F401 (the shim's names)
from smplora_plugin.errors import HoldoutError
from smplora_plugin.holdout import check_disjoint, write_manifest

from .._common import IMAGE_EXTENSIONS, list_images
from . import reach

logger = logging.getLogger("smplora.kohya")

ROLE_KEY = "smplora_role"  # tag in each subset's custom_attributes dict (batches carry these dicts)
DATASET_SKIP_KEYS = {"subsets", "validation_split", "validation_seed"}
SUBSET_SKIP_KEYS = {"image_dir", "num_repeats", "is_reg", "class_tokens", "metadata_file", "conditioning_data_dir",
                    "custom_attributes", "cache_info"}


def image_extensions() -> Tuple[str, ...]:
    """kohya's image extensions (``library.train_util.IMAGE_EXTENSIONS``); a default list outside sd-scripts."""
    if "library" not in sys.modules and importlib.util.find_spec("library") is None:   # outside sd-scripts
        return IMAGE_EXTENSIONS
    return tuple(e.lower() for e in reach.library_attr("train_util", "IMAGE_EXTENSIONS"))


def holdout_subfolders(holdout_dir: Path) -> List[Tuple[Path, List[Path]]]:
    """The ``<repeats>_<name>`` subfolders of a holdout dir and their images; clear errors if unusable."""
    holdout_dir = Path(holdout_dir)
    if not holdout_dir.exists():
        raise HoldoutError(f"--privacy_holdout_dir {holdout_dir} does not exist. Create it in kohya's folder layout "
                           f"(e.g. {holdout_dir}/1_mychar/img001.png) with images that are NOT in the training data.")
    if not holdout_dir.is_dir():
        raise HoldoutError(f"--privacy_holdout_dir {holdout_dir} is not a folder.")
    exts = image_extensions()
    found: List[Tuple[Path, List[Path]]] = []
    loose = list_images(holdout_dir, exts, recursive=False)
    for sub in sorted(p for p in holdout_dir.iterdir() if p.is_dir()):
        head = sub.name.split("_", 1)[0]
        if not head.isdigit() or int(head) < 1:
            continue
        images = list_images(sub, exts, recursive=False)
        if images:
            found.append((sub, images))
    if not found:
        hint = (f" It has {len(loose)} image(s) directly inside: move them into a subfolder such as "
                f"{holdout_dir}/1_{holdout_dir.name}/ (kohya's <repeats>_<name> layout)." if loose else "")
        raise HoldoutError(f"--privacy_holdout_dir {holdout_dir} holds no images in kohya's folder layout "
                           f"(<repeats>_<name>/ subfolders with {', '.join(exts[:5])} files).{hint} "
                           "Non-member images are needed to train the proxy attacker.")
    return found


def holdout_dataset_config(args, holdout_dir: Path) -> Dict[str, Any]:
    """The user's dataset config (from ``--dataset_config`` or the CLI folders) plus one dataset block
    holding ``holdout_dir`` with ``validation_split = 1.0`` (kohya never trains on it)."""
    folders = holdout_subfolders(holdout_dir)
    if getattr(args, "dataset_config", None):
        user_config = reach.library_attr("config_util", "load_user_config")(args.dataset_config)
    elif getattr(args, "in_json", None) is not None:
        user_config = {"datasets": [{"subsets": [{"image_dir": args.train_data_dir, "metadata_file": args.in_json}]}]}
    else:
        by_subdirs = reach.library_attr("config_util", "generate_dreambooth_subsets_config_by_subdirs")
        user_config = {"datasets": [{"subsets": by_subdirs(args.train_data_dir, getattr(args, "reg_data_dir", None))}]}
    datasets = list(user_config.get("datasets") or [])
    if not datasets:
        raise HoldoutError("the training dataset config has no [[datasets]] block; cannot add the holdout folder.")
    first = datasets[0]
    dataset_opts = {k: v for k, v in first.items() if k not in DATASET_SKIP_KEYS}
    member_subsets = [s for s in first.get("subsets", []) if not s.get("is_reg", False)]
    subset_opts = {k: v for k, v in (member_subsets[0] if member_subsets else {}).items() if k not in SUBSET_SKIP_KEYS}
    holdout_subsets = []
    for sub, _ in folders:
        repeats, _, tokens = sub.name.partition("_")
        holdout_subsets.append({**subset_opts, "image_dir": str(sub.resolve()), "num_repeats": int(repeats),
                                "is_reg": False, "class_tokens": tokens})
    new = dict(user_config)
    new["datasets"] = datasets + [{**dataset_opts, "validation_split": 1.0, "subsets": holdout_subsets}]
    return new


def write_dataset_config(config: Dict[str, Any], path: Path) -> Path:
    """Write atomically, with the mode a plain ``open()`` gives (every process of a multi-GPU run may
    write the same content: unique temporary names)."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))


def asks_validation(args, config: Dict[str, Any]) -> bool:
    """Whether the user asked kohya to validate: ``--validate_every_n_epochs`` / ``--validate_every_n_steps``,
    a carve-out, or a validation dataset of their own (any block but the holdout's, the last one)."""
    if any(getattr(args, name, None) is not None for name in ("validate_every_n_epochs", "validate_every_n_steps")):
        return True
    if float(getattr(args, "validation_split", 0.0) or 0.0) > 0.0:   # a CLI carve-out (config ones: below)
        return True
    general = config.get("general") or {}
    return any(float(d.get("validation_split", general.get("validation_split", 0.0)) or 0.0) > 0.0
               for d in (config.get("datasets") or [])[:-1])


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` / torchrun job (before kohya builds its Accelerator)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def uses_validation_split(args) -> bool:
    """Whether the CLI or the dataset config carves a validation split (0 < split < 1) out of training images
    (a dataset with ``validation_split = 1.0`` is a whole held-out dataset, not a carve-out)."""
    if 0.0 < float(getattr(args, "validation_split", 0.0) or 0.0) < 1.0:
        return True
    path = getattr(args, "dataset_config", None)
    if not path:
        return False
    load_user_config = reach.library_attr("config_util", "load_user_config")
    try:
        cfg = load_user_config(path)
    except Exception:  # noqa: BLE001 - kohya reports its own config errors
        return False
    general = cfg.get("general") or {}
    return any(0.0 < float(d.get("validation_split", general.get("validation_split", 0.0)) or 0.0) < 1.0
               for d in cfg.get("datasets") or [])


# ---------------------------------------------------------------------------- dataset groups
def group_images(group) -> Tuple[List[str], List[str]]:
    """(non-reg image paths, reg image paths) of a kohya DatasetGroup."""
    if group is None:
        return [], []
    datasets = getattr(group, "datasets", None)
    if datasets is None:
        raise HoldoutError(f"the dataset is a {type(group).__name__} (--dataset_class?), not one of kohya's own "
                           "dataset groups; SMP-LoRA needs kohya's DreamBooth or fine-tuning datasets to know members "
                           "from non-members.")
    members, regs = [], []
    for ds in datasets:
        for info in getattr(ds, "image_data", {}).values():
            path = getattr(info, "absolute_path", None) or getattr(info, "image_key", None)
            (regs if getattr(info, "is_reg", False) else members).append(str(path))
    return sorted(set(members)), sorted(set(regs))


def member_rows(batch: Dict[str, Any], batch_size: int) -> List[int]:
    """Rows of a kohya batch that are member images (not regularisation, not DOP)."""
    attrs = batch.get("custom_attributes")
    if not attrs:
        # no tags available: fall back to kohya's prior_loss_weight marking of reg images only if it differs from 1
        return list(range(batch_size))
    rows = []
    for i, a in enumerate(attrs):
        a = a or {}
        if a.get(ROLE_KEY, "member") != "member" or a.get("diff_output_preservation"):
            continue
        rows.append(i)
    return rows


_SIZE_KEYS = ("loss_weights", "latents", "images", "network_multipliers")


def batch_rows(batch: Any) -> Optional[int]:
    """Samples in a kohya batch: the leading size of its per-sample ``loss_weights`` (else ``latents``,
    ``images``, ``network_multipliers``, else the length of ``captions``); ``None`` when none is there."""
    if not isinstance(batch, dict):
        return None
    for key in _SIZE_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    captions = batch.get("captions")
    return len(captions) if isinstance(captions, (list, tuple)) and captions else None


def first_rows(value: Any, n: int, batch_size: int) -> Any:
    """``value`` (a kohya batch, or one of its entries) cut to its first ``n`` of ``batch_size`` samples.

    - a tensor whose leading size is ``batch_size``: its first ``n`` rows;
    - a list / tuple of tensors (and ``None``): kohya's per-text-encoder lists (``input_ids_list``,
      ``text_encoder_outputs_list``), each tensor cut, the list kept whole;
    - any other list / tuple of length ``batch_size`` (``captions``, ``custom_attributes``, ``flippeds``...):
      its first ``n`` items;
    - a dict: the same, entry by entry (a new dict; the input is not changed);
    - anything else (scalars, strings, ``None``, tensors of another leading size): unchanged.
    """
    if isinstance(value, torch.Tensor):
        return value[:n] if value.ndim >= 1 and value.shape[0] == batch_size else value
    if isinstance(value, dict):
        return {key: first_rows(item, n, batch_size) for key, item in value.items()}
    if type(value) in (list, tuple):
        items = list(value)
        tensors = any(isinstance(x, torch.Tensor) for x in items)
        if tensors and all(x is None or isinstance(x, torch.Tensor) for x in items):
            out = [first_rows(x, n, batch_size) for x in items]
        elif len(items) == batch_size:
            out = items[:n]
        else:
            return value
        return out if isinstance(value, list) else tuple(out)
    return value


def check_and_record(train_group, val_group, *, manifest: Optional[Path], seed: int, source: str,
                     extra: Optional[Dict[str, Any]] = None, require_nonmembers: bool = True) -> Dict[str, List[str]]:
    """Check members/reg vs non-members are disjoint by content; write the manifest (unless ``manifest``
    is ``None``: the caller writes it later with :func:`record`). Returns the sets. Non-members are optional
    only with ``require_nonmembers=False`` (DP-SGD alone trains no attacker)."""
    members, regs = group_images(train_group)
    nonmembers, val_regs = group_images(val_group)
    nonmembers = sorted(set(nonmembers) | set(val_regs))
    if not nonmembers and require_nonmembers:
        raise HoldoutError(
            "SMP-LoRA needs non-member images (never trained on) for its proxy attacker, and this run has none. "
            "Add --privacy_holdout_dir DIR (kohya folder layout, e.g. DIR/1_mychar/*.png, images NOT in the "
            "training set), or --validation_split 0.1 to carve 10% of the training images out (they are then "
            "not trained on), or a [[datasets]] block with validation_split = 1.0 in your dataset config.")
    if not members:
        raise HoldoutError("the training dataset has no member (non-regularisation) images.")
    files_train = [p for p in members + regs if Path(p).is_file()]
    files_hold = [p for p in nonmembers if Path(p).is_file()]
    if files_hold:
        check_disjoint(files_train, files_hold, train_name="training/regularisation", holdout_name="non-member")
    splits = {"member": members, "nonmember": nonmembers}
    if regs:
        splits["regularization"] = regs
    if manifest is not None and is_main_process():
        record(manifest, splits, seed=seed, source=source, extra=extra)
    return splits


def record(manifest: Path, splits: Dict[str, List[str]], *, seed: int, source: str,
           extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the member / non-member manifest (every file with its SHA-256, by set)."""
    return write_manifest(manifest, splits, seed=seed, extra={"source": source, **(extra or {})})


# ---------------------------------------------------------------------------- non-member draws
class NonmemberPool:
    """Seeded, resumable draws of ready batches from kohya's validation dataset group.

    Batch ``c`` is item ``perm_k[c mod n]`` of the group, where ``perm_k`` is a fresh seeded
    permutation for each pass ``k = c // n``; with several processes each rank takes its own slot.
    """

    def __init__(self, group, seed: int, rank: int = 0, world_size: int = 1):
        self.group = group
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.n = len(group)
        if self.n == 0:
            raise HoldoutError("the non-member dataset group is empty (no batches); check --privacy_holdout_dir / "
                               "validation_split.")
        self._perm_pass = -1
        self._perm: List[int] = []

    def index(self, counter: int) -> int:
        slot = counter * self.world_size + self.rank
        k, pos = divmod(slot, self.n)
        if k != self._perm_pass:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_pass = k
        return self._perm[pos]

    def batch(self, counter: int) -> Dict[str, Any]:
        return self.group[self.index(counter)]


@contextmanager
def forked_rng(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block with seeded torch/python RNGs and restore the trainer's streams afterwards,
    so the extra non-member forward leaves kohya's noise, timesteps and augmentations unchanged."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def describe(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(Path(p).name for p in paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")
