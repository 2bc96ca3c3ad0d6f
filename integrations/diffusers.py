"""SMP-LoRA for the diffusers example training scripts (diffusers / peft / accelerate).

Users copy ``train_text_to_image_lora.py`` or ``train_dreambooth_lora.py`` from diffusers and paste
a handful of lines (see ``docs/diffusers.md``)::

    from smplora_plugin.integrations.diffusers import HoldoutImages, PrivacyRegularizer, add_privacy_args
    add_privacy_args(parser)
    holdout = HoldoutImages.from_args(args, preprocess_train, collate_fn, accelerator)   # checks the folder
    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)    # None for --privacy none
    if reg:
        reg.attach(accelerator, holdout)                                   # checkpoint save/load hooks
    ...                  # predict(batch) -> (model_pred, target, base_pred): the script's forward, plus
    n = reg.privacy_rows(len(noisy_latents)) if reg else 0    # the batch's share in the privacy term
    base_pred = reg.reference(unet, lambda: unet(noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n],
                                                 return_dict=False)[0]) if reg else None   # None unless calibrated
    ...
    if reg:
        loss = reg.step(loss, reg.features(model_pred, target, reference=base_pred),
                        reg.nonmember_features(predict), update_attacker=accelerator.sync_gradients)
    ...
    if reg:
        accelerator.log(reg.log_dict(), step=global_step)
    ...
    if reg:
        reg.annotate(os.path.join(args.output_dir, "pytorch_lora_weights.safetensors"))

SDXL (``train_text_to_image_lora_sdxl.py``) and FLUX DreamBooth (``train_dreambooth_lora_flux.py``) take
the same calls; their forwards' lines are in ``examples/diffusers/PATCH_SDXL.md`` / ``PATCH_FLUX.md``.

This module holds no algorithm code: it moves data (held-out images through the script's own
preprocessing and forward) and state (accelerate checkpoint hooks) to the core
:class:`smplora_plugin.PrivacyRegularizer`. It imports neither diffusers nor accelerate at import
time; it works with any object that has accelerate's ``Accelerator`` interface.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import PrivacyConfig
from ..config import PRESETS
from ..errors import ConfigError, FeatureError, HoldoutError, StateError
from ..holdout import check_disjoint
from ..regularizer import PrivacyRegularizer as _CoreRegularizer
from ..state import read_state, save_state
from .summary import summary_box

__all__ = [
    "PrivacyRegularizer", "HoldoutImages", "add_privacy_args", "privacy_config_from_args",
    "privacy_regularizer_from_args", "nonmember_loss_maps", "instance_half", "list_images", "unwrap_model",
    "adapters_disabled", "base_prediction",
    "STATE_FILENAME", "IMAGE_EXTENSIONS",
]

PathLike = Union[str, "os.PathLike[str]"]
STATE_FILENAME = "smplora_state.safetensors"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_METHODS = {"none": None, "smplora": "smp", "smp": "smp", "mplora": "mp", "mp": "mp"}
_HOLDOUT_KEY = "shim.diffusers.holdout"
_PRESETS = tuple(PRESETS)
logger = logging.getLogger("smplora.diffusers")


# ---------------------------------------------------------------------------------------------- args
def add_privacy_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--privacy*`` options (an argument group) to a training script's parser.

    ``--privacy_preset`` picks the base values (:meth:`PrivacyConfig.preset`); each ``--privacy_*``
    hyperparameter flag overrides the preset only when it is given on the command line.
    """
    d = PrivacyConfig()
    g = parser.add_argument_group("privacy (smplora-plugin: SMP-LoRA membership-inference defense)")
    g.add_argument("--privacy", type=str.lower, default="none", choices=sorted(_METHODS),
                   help="none (default), smplora (SMP-LoRA: loss / (beta + alpha * attacker CE)) or mplora "
                        "(MP-LoRA baseline: loss - alpha * attacker CE); smp / mp are aliases.")
    g.add_argument("--privacy_preset", type=str.lower, default="paper", choices=_PRESETS,
                   help="paper (default): the paper's hyperparameters. robust: base-calibrated features, alpha 20, "
                        "attacker lr 1e-3, privacy term on a quarter of each batch (stronger against the full attack "
                        "suite; one extra no-grad base forward on that quarter per step). --privacy_* flags below "
                        "override the preset's values.")
    g.add_argument("--privacy_calibrated", action=argparse.BooleanOptionalAction, default=None,
                   help="Attacker sees loss maps minus the base model's (LoRA disabled) at the same noisy input; "
                        "costs a no-grad base forward per step (default: the preset's; robust turns it on).")
    g.add_argument("--privacy_fraction", type=float, default=None,
                   help="Share of the training samples whose loss maps feed the privacy term, taken over steps: step k "
                        "uses the first ceil((k+1) f B) - ceil(k f B) of its batch of B (at batch 1 and 0.25, one step "
                        "in four; the base forward runs on those only); held-out batches hold ceil(f B). "
                        f"Default: the preset's (paper {d.privacy_fraction:g}, robust 0.25).")
    g.add_argument("--privacy_holdout_dir", type=str, default=None,
                   help="Folder of held-out (non-member) images with captions (metadata.jsonl or .txt files). "
                        "Required with --privacy; must not share any image with the training data.")
    g.add_argument("--privacy_holdout_batch_size", type=int, default=None,
                   help="Non-member images per process and optimiser step (default: the privacy term's share "
                        "of --train_batch_size, see --privacy_fraction).")
    g.add_argument("--privacy_holdout_caption_column", type=str, default=None,
                   help="Caption field of the holdout metadata.jsonl (default: --caption_column or 'text').")
    # default=None throughout: only flags given on the command line override the preset
    g.add_argument("--privacy_alpha", type=float, default=None,
                   help=f"Weight of the attacker's member CE (paper {d.alpha}, robust 20).")
    g.add_argument("--privacy_beta", type=float, default=None, help=f"SMP denominator constant (> 0; {d.beta}).")
    g.add_argument("--privacy_delta", type=float, default=None,
                   help=f"Numerical guard in the SMP denominator ({d.delta}).")
    g.add_argument("--privacy_k_steps", type=int, default=None,
                   help=f"Attacker updates per optimiser step ({d.k_steps}).")
    g.add_argument("--privacy_attacker_lr", type=float, default=None,
                   help=f"Attacker Adam learning rate (paper {d.attacker_lr}, robust 1e-3).")
    g.add_argument("--privacy_attacker_weight_decay", type=float, default=None,
                   help=f"Attacker Adam weight decay ({d.attacker_weight_decay}).")
    g.add_argument("--privacy_attacker_hidden", nargs="+", default=None, action=_HiddenWidths, metavar="WIDTH",
                   help=f"Hidden widths of the attacker MLP ({' '.join(map(str, d.hidden))}; '512,256' works too). "
                        "Stored as a comma-separated string, so that trackers' hyperparameter logging "
                        "(init_trackers(config=vars(args)), e.g. tensorboard) accepts it.")
    g.add_argument("--privacy_attacker_dropout", type=float, default=None, help=f"Attacker dropout ({d.dropout}).")
    g.add_argument("--privacy_feature_grid", type=int, default=None,
                   help="Loss maps are pooled per channel down to (never up to) this square grid (default: the "
                        "preset's, paper 16, robust 32; SD1.5 latents at 512 px are 64; 0 = no pooling).")
    g.add_argument("--privacy_nonmember_every", type=int, default=None,
                   help="Run the held-out forward every this many attacker updates and reuse its features in "
                        f"between (1 = every optimiser step, as in the paper; default {d.nonmember_every}).")
    g.add_argument("--privacy_seed", type=int, default=None,
                   help="Seed of the attacker and of the holdout order (default: --seed, else 0).")
    return parser


def _hidden_widths(value: Any) -> Tuple[int, ...]:
    """Attacker widths from ``"512,256"``, ``"512 256"`` or a sequence of ints / strings."""
    text = value if isinstance(value, str) else " ".join(map(str, value))
    try:
        widths = tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ConfigError(f"--privacy_attacker_hidden {value!r}: give positive ints, e.g. 512 256 (or 512,256).")
    return widths


class _HiddenWidths(argparse.Action):
    """``--privacy_attacker_hidden 512 256`` (or ``512,256``) stored as the string ``"512,256"``: a list in
    ``vars(args)`` would break ``accelerator.init_trackers(config=vars(args))`` with tensorboard, whose
    hyperparameter log takes only scalars and strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            widths = _hidden_widths(values)
        except ConfigError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, ",".join(map(str, widths)))


# option name -> PrivacyConfig field
_ARG_FIELDS = {
    "privacy_alpha": "alpha", "privacy_beta": "beta", "privacy_delta": "delta", "privacy_k_steps": "k_steps",
    "privacy_attacker_lr": "attacker_lr", "privacy_attacker_weight_decay": "attacker_weight_decay",
    "privacy_attacker_dropout": "dropout", "privacy_calibrated": "calibrated",
    "privacy_nonmember_every": "nonmember_every", "privacy_fraction": "privacy_fraction",
}


def privacy_config_from_args(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None
                             ) -> Optional[PrivacyConfig]:
    """The :class:`PrivacyConfig` selected by ``--privacy*`` options; ``None`` for ``--privacy none``.

    Starts from ``--privacy_preset`` (default ``paper``) and applies the ``--privacy_*`` values that
    were given (not ``None``). Raises :class:`smplora_plugin.errors.ConfigError` for invalid values and
    :class:`HoldoutError` when a privacy method is chosen without ``--privacy_holdout_dir``.
    """
    method = _arg(args, "privacy", "none")
    method = str(method).lower()
    if method not in _METHODS:
        raise HoldoutError(f"--privacy {method!r} is unknown; choose one of none, smplora, mplora.")
    objective = _METHODS[method]
    if objective is None:
        return None
    if not _arg(args, "privacy_holdout_dir"):
        raise HoldoutError(
            f"--privacy {method} needs non-member images: pass --privacy_holdout_dir pointing to held-out images "
            "of the same kind as the training set (never trained on), e.g. 10-20% of your data set aside."
        )
    overrides: Dict[str, Any] = {f: getattr(args, a) for a, f in _ARG_FIELDS.items() if _arg(args, a) is not None}
    if _arg(args, "privacy_attacker_hidden") is not None:
        overrides["hidden"] = _hidden_widths(args.privacy_attacker_hidden)
    grid = _arg(args, "privacy_feature_grid")
    if grid is not None:
        overrides["feature_grid"] = None if grid == 0 else grid
    overrides.update(objective=objective, seed=_privacy_seed(args), device=None if device is None else str(device))
    return PrivacyConfig.preset(str(_arg(args, "privacy_preset", "paper")).lower(), **overrides)


def privacy_regularizer_from_args(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None,
                                  **kwargs: Any) -> Optional["PrivacyRegularizer"]:
    """A :class:`PrivacyRegularizer` from ``--privacy*`` options, or ``None`` for ``--privacy none``."""
    cfg = privacy_config_from_args(args, device=device)
    return None if cfg is None else PrivacyRegularizer(cfg, **kwargs)


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _privacy_seed(args: Any) -> int:
    seed = _arg(args, "privacy_seed")
    if seed is None:
        seed = _arg(args, "seed", 0)
    return int(seed)


# ---------------------------------------------------------------------------------------------- holdout
def list_images(folder: PathLike) -> List[Path]:
    """Image files under ``folder`` (recursive, sorted), by extension."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_captions(folder: Path, files: Sequence[Path], caption_column: str) -> List[str]:
    """Captions from ``metadata.jsonl`` (``file_name`` + caption column) or sidecar ``.txt`` / ``.caption`` files."""
    by_name: Dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, 1):
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
        batch = _arg(args, "privacy_holdout_batch_size") or config.nonmember_rows(max(1, int(_arg(args, "train_batch_size", 1))))
        opts = dict(
            preprocess=preprocess, collate_fn=collate_fn, batch_size=int(batch), seed=_privacy_seed(args),
            image_column=_arg(args, "image_column", "image"),
            caption_column=_arg(args, "privacy_holdout_caption_column") or _arg(args, "caption_column", "text"),
            train_files=train_files, train_dir=_arg(args, "train_data_dir") or _arg(args, "instance_data_dir"),
            process_index=getattr(accelerator, "process_index", 0) if accelerator is not None else 0,
            num_processes=getattr(accelerator, "num_processes", 1) if accelerator is not None else 1,
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


def _verify_images(files: Sequence[Path]) -> None:
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as exc:  # PIL raises many types for corrupt data; OSError for permissions
            bad.append(f"{f} ({type(exc).__name__}: {exc})")
    if bad:
        shown = "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise HoldoutError(f"{len(bad)} holdout image(s) cannot be read: {shown}. Fix their permissions, "
                           "re-export them or remove them from the holdout folder.")


# ---------------------------------------------------------------------------------------------- forward helpers
def nonmember_loss_maps(reg: _CoreRegularizer, forward_fn: Callable[[Any], Tuple[torch.Tensor, ...]],
                        batch: Any) -> torch.Tensor:
    """Run the script's own forward without grad; return ``reg.features`` of the held-out batch.

    ``forward_fn(batch)`` returns ``(model_pred, target)`` or, with calibrated features,
    ``(model_pred, target, base_pred)`` where ``base_pred = reg.reference(unet, ...)``.
    """
    with torch.no_grad():
        out = forward_fn(batch)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise FeatureError("the non-member forward_fn must return (model_pred, target) or (model_pred, target, "
                               f"base_pred), got {type(out).__name__}"
                               + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
        pred, target = out[0], out[1]
        reference = out[2] if len(out) == 3 else None
        _check_unpacked(pred, reg.config.feature_grid)
        if reg.config.calibrated and reference is None:
            raise FeatureError(
                "calibrated features (--privacy_preset robust / --privacy_calibrated) need the base prediction of "
                "the held-out batch too: make the forward passed to reg.nonmember_features return (model_pred, "
                "target, base_pred) with base_pred = reg.reference(unet, lambda: unet(<same inputs>)[0]) (see "
                "docs/diffusers.md).")
        if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape != pred.shape):
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise FeatureError(f"the third value of the non-member forward must be the base prediction, shaped like "
                               f"model_pred {tuple(pred.shape)}; got {got}.")
        return _CoreRegularizer.features(reg, pred, target, reference=reference).detach()


def _check_unpacked(pred: Any, grid: Any) -> None:
    """Refuse a packed token prediction ``(B, tokens, D)`` (FLUX) where (B, C, H, W) loss maps are pooled."""
    if grid is not None and isinstance(pred, torch.Tensor) and pred.ndim == 3:
        raise FeatureError(
            f"model_pred has shape {tuple(pred.shape)}: a packed (B, tokens, channels) prediction, as FLUX's "
            "transformer returns. Unpack it to (B, C, H, W) latents first, as train_dreambooth_lora_flux.py does "
            "before its loss (FluxPipeline._unpack_latents(model_pred, height=..., width=..., vae_scale_factor=...)), "
            "and unpack the base prediction of reg.reference the same way (see docs/diffusers.md).")


def unwrap_model(model: Any, accelerator: Any = None) -> Any:
    """The model under accelerate / DDP / ``torch.compile`` wrappers (where the peft adapter methods live)."""
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        model = accelerator.unwrap_model(model)
    for _ in range(8):  # DDP / DataParallel / DeepSpeed (.module), torch.compile (._orig_mod)
        if _has_adapter_switch(model):
            break
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def _has_adapter_switch(model: Any) -> bool:
    return callable(getattr(model, "disable_adapter", None)) or (
        callable(getattr(model, "disable_adapters", None)) and callable(getattr(model, "enable_adapters", None)))


def _peft_layer_flags(model: torch.nn.Module) -> List[bool]:
    """``disable_adapters`` flags of the peft tuner layers (a bool property on peft's BaseTunerLayer)."""
    return [m.disable_adapters for m in model.modules() if isinstance(getattr(m, "disable_adapters", None), bool)]


@contextmanager
def adapters_disabled(model: Any, accelerator: Any = None) -> Iterator[Any]:
    """Run the block with the model's LoRA adapters off (the base model), then switch them back on.

    ``model`` may be wrapped by ``accelerator.prepare`` (DDP, autocast, ``torch.compile``): the
    adapters are switched on the unwrapped model, and calling the wrapped one inside the block is
    fine. Works with diffusers / transformers models (``disable_adapters`` / ``enable_adapters``)
    and peft ``PeftModel`` (``disable_adapter()``). Adapters already off stay off.
    """
    base = unwrap_model(model, accelerator)
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: only the diffusers methods can apply
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(base, PeftModel):
        with base.disable_adapter():
            yield base
        return
    if not (callable(getattr(base, "disable_adapters", None)) and callable(getattr(base, "enable_adapters", None))):
        raise FeatureError(
            f"cannot disable the LoRA of {type(base).__name__}: it has no disable_adapters()/enable_adapters() "
            "(diffusers/transformers with peft) nor disable_adapter() (peft PeftModel). Add the LoRA with "
            "unet.add_adapter(LoraConfig(...)), or pass calibrated=False.")
    flags = _peft_layer_flags(base)
    if flags and all(flags):  # already the base model
        yield base
        return
    base.disable_adapters()
    try:
        yield base
    finally:
        base.enable_adapters()


def base_prediction(model: Any, fn: Callable[[], torch.Tensor], accelerator: Any = None) -> torch.Tensor:
    """``fn()`` (the script's model call, e.g. ``lambda: unet(x, t, c, return_dict=False)[0]``) run under
    ``torch.no_grad()`` with the adapters of ``model`` disabled: the base model's prediction, detached."""
    with torch.no_grad(), adapters_disabled(model, accelerator):
        out = fn()
    if not isinstance(out, torch.Tensor):
        raise FeatureError(f"the base forward returned {type(out).__name__}, not the prediction tensor: make it "
                           "return the tensor, e.g. lambda: unet(noisy_latents, timesteps, encoder_hidden_states, "
                           "return_dict=False)[0].")
    return out.detach()


def instance_half(*tensors: torch.Tensor,
                  with_prior_preservation: bool = True) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The instance (member) half of DreamBooth prior-preservation tensors.

    ``train_dreambooth_lora.py`` stacks instance images first and class images second and splits
    them with ``torch.chunk(x, 2, dim=0)``; only the instance half is member data, so only it may
    reach the attacker. Without prior preservation the tensors are returned unchanged.
    """
    out = []
    for t in tensors:
        if with_prior_preservation:
            if t.shape[0] % 2:
                raise ValueError(f"prior-preservation batch has odd size {t.shape[0]}: expected instance images "
                                 "followed by as many class images.")
            t = torch.chunk(t, 2, dim=0)[0]
        out.append(t)
    return out[0] if len(out) == 1 else tuple(out)


def _to_device(batch: Any, device: Any) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- regulariser
class PrivacyRegularizer(_CoreRegularizer):
    """The core regulariser plus accelerate wiring: checkpoint hooks, holdout batches, logging.

    Adds no algorithm: :meth:`step`, :meth:`features` and the state are the core's.
    """

    accelerator: Any = None
    holdout: Optional[HoldoutImages] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None,
                  **kwargs: Any) -> Optional["PrivacyRegularizer"]:
        """Build from ``add_privacy_args`` options; ``None`` for ``--privacy none``."""
        cfg = privacy_config_from_args(args, device=device)
        return None if cfg is None else cls(cfg, **kwargs)

    # ---------------------------------------------------------------- accelerate
    def attach(self, accelerator: Any, holdout: Optional[HoldoutImages] = None, *,
               state_filename: str = STATE_FILENAME) -> Tuple[Any, Any]:
        """Register accelerate save / load pre-hooks and remember the holdout batches.

        ``accelerator.save_state(dir)`` then also writes ``dir/smplora_state.safetensors`` (attacker,
        its optimiser and RNG, counters, the holdout cursor) and ``accelerator.load_state(dir)``
        restores it. The attacker is never passed through ``accelerator.prepare`` and never
        registered with ``register_for_checkpointing`` (which pickles). Returns the two hook handles.
        """
        if self.accelerator is not None:
            raise StateError("this regulariser is already attached to an accelerator; attach it once.")
        self.accelerator = accelerator
        if holdout is not None:
            self.holdout = holdout
        self._state_filename = state_filename

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            if getattr(accelerator, "is_main_process", True):
                self.save_checkpoint(output_dir)

        def load_hook(models: list, input_dir: str) -> None:
            self.load_checkpoint(input_dir)

        handles = (accelerator.register_save_state_pre_hook(save_hook),
                   accelerator.register_load_state_pre_hook(load_hook))
        if getattr(accelerator, "is_main_process", True):
            print(self.summary(), flush=True)
        return handles

    def summary(self) -> str:
        """The start-up summary :meth:`attach` prints (like kohya's box): method, settings, the held-out
        images and what the loss display and the trackers show."""
        cfg = self.config
        method = "SMP-LoRA" if cfg.objective == "smp" else "MP-LoRA (baseline)"
        lines = [f"{method} (smplora-plugin {_version()}): alpha={cfg.alpha:g}, beta={cfg.beta:g}, "
                 f"k_steps={cfg.k_steps}, attacker lr {cfg.attacker_lr:g}"]
        if cfg.calibrated:
            lines.append("base-calibrated features: one extra no-grad UNet forward with the LoRA disabled "
                         "(reg.reference)")
        if cfg.privacy_fraction < 1:
            lines.append(f"privacy fraction {cfg.privacy_fraction:g}, taken over steps: step k's privacy term (and its "
                         f"forwards) uses the first ceil((k+1) f B) - ceil(k f B) images of its batch of B")
        h = self.holdout
        if h is not None:
            checked = (f"checked against {h.train_checked} training images (no byte-identical file)"
                       if h.train_checked else "NOT checked against the training images (no --train_data_dir)")
            lines.append(f"non-members (NEVER trained on): {len(h)} images in {h.folder}, {h.batch_size} per "
                         f"process and step; {checked}")
        lines += ["loss display: step_loss / train_loss stay the script's denoising loss; the gradient is the "
                  "regularised loss's (reg.step keeps the loss value)",
                  "progress bar: mia_ce (attacker CE on members, higher = better hidden) and mia_acc (its "
                  "balanced accuracy, 0.5 = chance); trackers: smplora/* (reg.log_dict)",
                  f"checkpoints: <checkpoint>/{getattr(self, '_state_filename', STATE_FILENAME)}"]
        return summary_box(lines)

    # keep the name used in the ecosystem notes
    attach_accelerator = attach

    def save_checkpoint(self, folder: PathLike) -> Path:
        """Write the regulariser state and holdout cursor to ``folder/smplora_state.safetensors``."""
        state = self.state_dict()
        if self.holdout is not None:
            state[_HOLDOUT_KEY] = json.dumps(self.holdout.state_dict(), sort_keys=True)
        return save_state(state, Path(folder) / getattr(self, "_state_filename", STATE_FILENAME))

    def load_checkpoint(self, folder: PathLike) -> None:
        """Restore :meth:`save_checkpoint` output (validated whole before anything changes)."""
        path = Path(folder) / getattr(self, "_state_filename", STATE_FILENAME)
        if not path.is_file():
            raise StateError(
                f"checkpoint {folder} has no {path.name}: it was saved without --privacy (or by another tool). "
                "Resume it without --privacy, or start a new run with --privacy."
            )
        state = read_state(path)
        holdout_state = None
        if _HOLDOUT_KEY in state:
            try:
                holdout_state = json.loads(state.pop(_HOLDOUT_KEY))
            except ValueError as exc:
                raise StateError(f"{path} holds a corrupt holdout cursor ({exc}).") from exc
        if self.holdout is not None and holdout_state is not None:
            self.holdout.check_state(holdout_state)  # raises before any change
        self.load_state_dict(state)
        if self.holdout is not None and holdout_state is not None:
            self.holdout.load_state_dict(holdout_state)

    # ---------------------------------------------------------------- loss
    def step(self, loss: torch.Tensor, member_feats: torch.Tensor, nonmember_feats: Optional[torch.Tensor] = None,
             *, update_attacker: bool = True, keep_loss_value: bool = True) -> torch.Tensor:
        """The core :meth:`~smplora_plugin.PrivacyRegularizer.step`, returning by default a loss with the
        value of ``loss`` (so the script's ``step_loss`` / ``train_loss`` and its trackers keep showing
        the denoising loss) and the gradient of the regularised loss; ``keep_loss_value=False`` returns
        the regularised loss itself. Its value is in ``metrics()["regularized_loss"]`` either way."""
        return super().step(loss, member_feats, nonmember_feats, update_attacker=update_attacker,
                            keep_loss_value=keep_loss_value)

    # ---------------------------------------------------------------- calibration
    def reference(self, model: Any, fn: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        """The base prediction for calibrated features, or ``None`` (and no forward) when not calibrated.

        ``fn`` repeats the training forward's model call at the same inputs, e.g.
        ``reg.reference(unet, lambda: unet(noisy_latents, timesteps, encoder_hidden_states,
        return_dict=False)[0])``; it runs once more under ``no_grad`` with the LoRA of ``model``
        disabled (see :func:`base_prediction`). Pass the result as ``reference=`` to :meth:`features`
        and as the third value of the forward given to :meth:`nonmember_features`.
        """
        if not self.config.calibrated or self._no_rows_now():
            return None     # no forward: not calibrated, or no privacy row on this step (reg.privacy_rows gave 0)
        return base_prediction(model, fn, self.accelerator)

    def features(self, pred: torch.Tensor, target: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                 reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Member features of a training batch: the core's :meth:`~smplora_plugin.PrivacyRegularizer.features`
        on its first ``n = reg.privacy_rows(len(pred))`` samples (the whole batch unless
        ``--privacy_fraction`` < 1), with script-level hints when ``reference`` is missing or was not
        computed on those ``n`` samples. ``None`` when ``n`` is 0 (``privacy_fraction`` taken over steps):
        ``reg.step(loss, None, ...)`` then scales the loss by the last denominator."""
        _check_unpacked(pred, self.config.feature_grid)
        n = self.privacy_rows(int(pred.shape[0])) if isinstance(pred, torch.Tensor) and pred.ndim else None
        if n == 0:
            return None
        if n is not None and isinstance(reference, torch.Tensor) and reference.ndim and reference.shape[0] != n:
            raise FeatureError(
                f"base_pred has {reference.shape[0]} samples but the privacy term uses the first {n} of the "
                f"{pred.shape[0]} in the batch (privacy_fraction={self.config.privacy_fraction:g}): compute it as "
                "n = reg.privacy_rows(len(noisy_latents)); base_pred = reg.reference(unet, lambda: "
                "unet(noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n], return_dict=False)[0]) "
                "(see docs/diffusers.md).")
        if n is not None and isinstance(target, torch.Tensor) and target.shape[:1] == pred.shape[:1]:
            pred, target = pred[:n], target[:n]
            timesteps = timesteps[:n] if isinstance(timesteps, torch.Tensor) and timesteps.ndim else timesteps
        if self.config.calibrated and reference is None:
            raise FeatureError(
                "calibrated features (--privacy_preset robust / --privacy_calibrated) need the base model's "
                "prediction at the same noisy input: compute n = reg.privacy_rows(len(noisy_latents)); base_pred = "
                "reg.reference(unet, lambda: unet(noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n], "
                "return_dict=False)[0]) next to the training forward and call reg.features(model_pred, target, "
                "reference=base_pred) (see docs/diffusers.md).")
        return super().features(pred, target, timesteps=timesteps, reference=reference)

    # ---------------------------------------------------------------- data
    def nonmember_features(self, forward_fn: Callable[[Any], Tuple[torch.Tensor, ...]],
                           batch: Any = None, *, sync: Optional[bool] = None) -> Optional[torch.Tensor]:
        """Features of the next held-out batch through the script's forward, or ``None`` when not needed.

        Returns ``None`` (and draws nothing) when the core does not need fresh non-members
        (``reg.wants_nonmembers``): on gradient-accumulation micro-steps, i.e. when ``sync``
        (default: ``accelerator.sync_gradients``) is false, so the attacker updates once per
        optimiser step; when ``k_steps == 0``; and between refreshes of ``nonmember_every``.
        ``forward_fn(batch)`` must return ``(model_pred, target)`` exactly as the training forward
        does, plus ``base_pred`` (``reg.reference(...)``) as a third value with calibrated features;
        it runs under ``no_grad``.
        """
        if sync is None:
            sync = bool(getattr(self.accelerator, "sync_gradients", True))
        if self._no_rows_now() or not self.wants_nonmembers(update_attacker=sync):
            return None
        if batch is None:
            if self.holdout is None:
                raise HoldoutError("no holdout batches attached: pass HoldoutImages to reg.attach(accelerator, "
                                   "holdout) or give the batch explicitly.")
            batch = next(self.holdout)
        batch = _to_device(batch, getattr(self.accelerator, "device", None))
        self._nonmember_pass = True  # privacy_rows(n) is n inside: a held-out batch is used whole
        try:
            return nonmember_loss_maps(self, forward_fn, batch)
        finally:
            self._nonmember_pass = False

    def privacy_rows(self, batch_size: int, *, with_prior_preservation: bool = False) -> int:
        """Rows of this step's batch that feed the privacy term (the core's schedule: ``privacy_fraction``
        taken over steps, possibly 0) for the training batch, all of them for the held-out batch inside
        :meth:`nonmember_features` (its size is already that share: ``--privacy_holdout_batch_size``
        defaults to ``reg.nonmember_rows(train_batch_size)``). A 0 for the training batch makes
        :meth:`reference`, :meth:`features` and :meth:`nonmember_features` of this step return ``None``
        without a forward.

        ``with_prior_preservation=True`` (DreamBooth: instance images first, then as many class
        images) counts the instance half only, so the first rows never reach a class image; a
        held-out batch has no class images and is used whole either way.
        """
        rows = super().privacy_rows(batch_size)  # validates batch_size
        if getattr(self, "_nonmember_pass", False):
            return batch_size
        if with_prior_preservation:
            if batch_size % 2:
                raise FeatureError(f"prior-preservation batch has odd size {batch_size}: expected instance images "
                                   "followed by as many class images.")
            rows = super().privacy_rows(batch_size // 2)
        self._rows_at = (self.global_step, rows)
        return rows

    def _no_rows_now(self) -> bool:
        """Whether :meth:`privacy_rows` gave 0 for the training batch of the current step."""
        return getattr(self, "_rows_at", None) == (self.global_step, 0) and not getattr(self, "_nonmember_pass", False)

    # ---------------------------------------------------------------- logging
    def log_dict(self, prefix: str = "smplora/") -> Dict[str, float]:
        """:meth:`metrics` with a prefix, for ``accelerator.log(..., step=global_step)``."""
        return {prefix + k: float(v) for k, v in self.metrics().items()}

    def progress_postfix(self) -> Dict[str, str]:
        """A compact dict for ``progress_bar.set_postfix``: ``mia_ce`` (the attacker's cross-entropy on
        members) and ``mia_acc`` (its balanced accuracy), the names the kohya shim shows too."""
        return super().progress_postfix()


def _version() -> str:
    from .. import __version__

    return __version__
