"""One private ai-toolkit process: the checks before anything is written, the forwards it captures, the privacy
term, the saves. :mod:`.process` builds the ``SDTrainer`` subclass that hands each hook to a :class:`PrivateRun`.

Per optimiser step (``hook_train_loop``, its batches in a list):

1. when the attacker is due fresh non-members on this step's last batch, a held-out batch
   (:class:`.holdout.NonmemberPool`) runs through ``SDTrainer.train_single_accumulation`` itself, under
   ``no_grad`` with seeded random streams that are put back afterwards, and stops at ``calculate_loss`` (before
   the backward), where its loss maps are taken;
2. each training batch runs as usual; its ``predict_noise(..., is_primary_pred=True)`` call is recorded, and
   ``calculate_loss`` returns the trainer's own loss passed through the core: ``reg.step(loss, member features,
   non-member features)``, with ``keep_loss_value`` (the trainer's ``loss`` display keeps the denoising loss).
   Members are the batch's non-regularisation rows, the first ``reg.privacy_rows(m)`` of them; with calibrated
   features their base prediction replays the recorded call with the LoRA off (:func:`.forward.base_prediction`).

With DP noise (``method: dpsgd``: DP-SGD alone, ai-toolkit's own loss, no attacker and no held-out forward; or
``method: smplora`` with ``noise_multiplier``: each image's own SMP-LoRA term, ``reg.step_per_sample``), each
training batch first hands the previous backward's per-sample gradients to the core (``DPTraining.collect``); the
optimiser's step pre-hook then writes the clipped, noised gradient in place of ai-toolkit's (:mod:`.dp_noise`).

All algorithm code is the core's (:class:`smplora_plugin.PrivacyRegularizer`, :mod:`smplora_plugin.dp`).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.dp import DPError, DPTraining
from smplora_plugin.errors import ConfigError, SmploraError, StateError
from smplora_plugin.integrations._common import IMAGE_EXTENSIONS, summary_box
from smplora_plugin.metadata import build_privacy_metadata
from smplora_plugin.state import config_from_state, read_state

from . import dp_noise
from . import holdout as ho
from .config import BLOCK, AitkPrivacySettings, check_train_options, parse_privacy_block
from .forward import base_prediction, loss_target

STATE_DIR = "_smplora"                # in ai-toolkit's save root; only a job name starting with _ globs it
STATE_SUFFIX = ".smplora_state"       # safetensors; no .safetensors suffix, so LoRA pickers do not list it
MANIFEST = "holdout_manifest.json"
INTEGRATION = "ai-toolkit"


def say(message: str) -> None:
    """One line of the shim's output, printed as ai-toolkit prints its own."""
    print(f"SMP-LoRA: {message}", flush=True)


class _HeldOutDone(Exception):
    """Stops a held-out forward at ``calculate_loss``, before the trainer's backward."""


class Forward:
    """One ``train_single_accumulation`` being captured."""

    __slots__ = ("kind", "sync", "call", "done")

    def __init__(self, kind: str, sync: bool = False):
        self.kind = kind                            # "member" or "heldout"
        self.sync = sync                            # the optimiser steps after this batch
        self.call: Optional[Dict[str, Any]] = None  # the primary predict_noise call's arguments, by name
        self.done = False                           # calculate_loss has run for it


def member_rows(batch: Any) -> List[int]:
    """Rows of an ai-toolkit batch that are members (file items not from an ``is_reg`` dataset)."""
    return [i for i, item in enumerate(getattr(batch, "file_items", None) or []) if not getattr(item, "is_reg", False)]


def save_root_of(config: Mapping[str, Any], job: Any) -> Path:
    """ai-toolkit's save root for a process config: ``training_folder/<process name or job name>``."""
    folder = config.get("training_folder", getattr(job, "training_folder", None))
    if not folder:
        raise ConfigError("the process has no training_folder; ai-toolkit needs one to save into.")
    return Path(str(folder)) / str(config.get("name", getattr(job, "name", "")))


def state_path(save_root: Path, checkpoint: str) -> Path:
    """Where the attacker state of the checkpoint ``checkpoint`` (a path or a file stem) is saved."""
    return Path(save_root) / STATE_DIR / f"{Path(checkpoint).stem}{STATE_SUFFIX}"


class PrivateRun:
    """The privacy side of one ``sd_trainer_smplora`` process."""

    def __init__(self, settings: AitkPrivacySettings, splits: Dict[str, List[Path]], save_root: Path,
                 holdout_config: Optional[Dict[str, Any]], dp_rows: int = 0):
        self.settings = settings
        # None for DP-SGD alone (method: dpsgd): ai-toolkit's own loss, no attacker
        self.reg: Optional[PrivacyRegularizer] = (PrivacyRegularizer(settings.config)
                                                  if settings.config is not None else None)
        self.dp: Optional[DPTraining] = None          # built at the first step (DP noise only)
        self.dp_rows = dp_rows                        # N of the accountant
        self.dp_state: Optional[Dict[str, Any]] = None   # the DP state of the checkpoint ai-toolkit resumed
        self.splits = splits
        self.save_root = save_root
        self.state_dir = save_root / STATE_DIR
        self.manifest = self.state_dir / MANIFEST
        self.holdout_config = holdout_config
        self.pool: Optional[ho.NonmemberPool] = None
        self.forward: Optional[Forward] = None
        self.pending: Optional[torch.Tensor] = None   # non-member features for this step's last batch
        self.step_batches = 0
        self.batch_index = 0
        self.started = False
        self.feature_rows = {"member": 0, "nonmember": 0}
        self.reg_only_batches = 0
        self.resumed_from_step: Optional[int] = None
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------ before ai-toolkit writes anything
    @classmethod
    def plan(cls, config: Mapping[str, Any], job: Any, *, num_processes: int = 1,
             extensions: Sequence[str] = IMAGE_EXTENSIONS, mixed_precision: Any = None) -> Optional["PrivateRun"]:
        """Every check that needs no model, in the process's ``__init__`` before ai-toolkit's (which writes the
        config copy): the ``privacy:`` block, the train options, the holdout against every dataset, the saved
        attacker states. ``None`` when the process has no privacy term."""
        settings = parse_privacy_block(config.get(BLOCK), default_seed=config.get("training_seed"))
        if settings is None:
            say(f"this {INTEGRATION} process has NO membership-inference defense (no {BLOCK}: block, or method: "
                "none); it trains exactly as type: sd_trainer.")
            return None
        if config.get("network") is None:
            raise ConfigError(f"the {BLOCK}: block needs a network: block (a LoRA / LoCon): SMP-LoRA and DP noise "
                              "act on a LoRA, and this process fine-tunes the whole model.")
        if settings.dp is not None:
            dp_noise.check_process(config, mixed_precision, settings.dp.accountant)
        if settings.config is not None:
            check_train_options(config.get("train") or {})
        if settings.config is not None and settings.config.calibrated:
            trained = [k for k in ("embedding", "adapter", "decorator") if config.get(k) is not None]
            if trained:
                raise ConfigError(f"calibrated features (privacy.preset robust / privacy.calibrated) switch the LoRA "
                                  f"off for the base prediction, but this process also trains {', '.join(trained)}, "
                                  "which would stay on. Use privacy.preset paper, or train the LoRA alone.")
        if int(num_processes) > 1:
            raise ConfigError(f"the SMP-LoRA process runs on one process; this one has {num_processes} (accelerate "
                              "launch with several GPUs has not been tested with it). Run it on one GPU.")
        root = save_root_of(config, job)
        name = root.name
        if name and STATE_DIR.startswith(name):
            raise ConfigError(f"the job name {name!r} is the start of {STATE_DIR!r}, the folder the attacker state "
                              f"is kept in under {root}: ai-toolkit's resume (get_latest_save_path, '{name}*') would "
                              "take that folder for a checkpoint. Rename the job.")
        datasets = config.get("datasets") or []
        if settings.holdout_folder is not None:
            splits = ho.check_holdout(settings.holdout_folder, datasets, extensions)
            heldout = ho.holdout_dataset(datasets, settings.holdout_folder) if settings.config is not None else None
        else:   # DP-SGD alone without a holdout: the members, for the manifest
            members, regs = ho.dataset_images(datasets, extensions)
            splits = {"member": members, **({"regularization": regs} if regs else {})}
            heldout = None
        rows = dp_noise.training_rows(datasets, extensions) if settings.dp is not None else 0
        run = cls(settings, splits, root, heldout, dp_rows=rows)
        run.check_saved_states()
        if settings.attacker_state is not None:
            run.load_state(settings.attacker_state)
        return run

    def check_saved_states(self) -> None:
        """Refuse, before training, attacker states in the save root that a resume could load but that were saved
        with other privacy settings."""
        if not self.state_dir.is_dir():
            return
        if self.settings.dp is not None:
            dp_noise.check_saved_states(self.state_dir, self.settings.dp)
        if self.reg is None:
            return
        mine = self.reg.config.algorithm_fields()
        for path in sorted(self.state_dir.glob(f"*{STATE_SUFFIX}")):
            saved = config_from_state(read_state(path), path).algorithm_fields()
            differ = {k: saved[k] for k in mine if mine[k] != saved[k]}
            if differ:
                shown = ", ".join(f"{BLOCK}.{k}: saved {v!r}, this run {mine[k]!r}" for k, v in differ.items())
                raise StateError(f"{path} was saved with other privacy settings ({shown}); this run would resume "
                                 f"it. Use the same settings, or move {self.state_dir} and its checkpoints away to "
                                 "start a new run. Nothing was trained.")

    def summary(self) -> str:
        counts = {k: len(v) for k, v in self.splits.items()}
        opts = self.settings.dp
        noise = ""
        if opts is not None:
            level = (f"sigma {opts.noise_multiplier:g}" if opts.noise_multiplier is not None
                     else f"target epsilon {opts.target_epsilon:g}")
            noise = (f"DP noise: {level}, per-sample clip {opts.max_grad_norm:g}, {self.dp_rows} training rows, "
                     f"{opts.accountant} accountant (all settings and the sampling assumption at the first step)")
        if self.reg is None:
            return summary_box([
                "DP-SGD alone (privacy.method: dpsgd) in ai-toolkit's SDTrainer: its own loss, no SMP-LoRA term",
                noise, f"members {counts['member']}" + (f", held-out {counts['nonmember']} (checked disjoint, "
                                                         f"{self.settings.holdout_folder})" if "nonmember" in counts
                                                         else ", no holdout folder"),
                f"manifest and DP states: {self.state_dir}",
            ])
        cfg = self.reg.config
        return summary_box([
            f"SMP-LoRA ({self.settings.method}, preset {self.settings.preset}) in ai-toolkit's SDTrainer",
            f"members {counts['member']}, held-out {counts['nonmember']} ({self.settings.holdout_folder})"
            + (f", regularisation {counts['regularization']} (never members)" if "regularization" in counts else ""),
            f"alpha {cfg.alpha:g}, attacker lr {cfg.attacker_lr:g}, feature grid {cfg.feature_grid}, "
            f"calibrated {cfg.calibrated}, privacy fraction {cfg.privacy_fraction:g}",
            *([noise] if noise else []),
            f"manifest and attacker states: {self.state_dir}",
            "an empirical defense: no differential-privacy guarantee; measure it with smplora audit"
            if opts is None else "the epsilon covers the noised LoRA updates given the attacker (docs/dp.md)",
        ])

    # ------------------------------------------------------------------ set-up inside ai-toolkit
    def build_pool(self, trainer: Any, get_dataloader: Callable[..., Any]) -> None:
        """The held-out images as an ai-toolkit dataset (next to the training ones, ``before_dataset_load``)."""
        if self.reg is None:
            return   # DP-SGD alone: no attacker, no held-out forward
        raw = dict(self.holdout_config)
        tc = trainer.train_config
        if getattr(tc, "cache_text_embeddings", False):   # ai-toolkit sets these on its own datasets too
            raw["cache_text_embeddings"] = True
        if getattr(tc, "diff_output_preservation", False):
            raw["diff_output_preservation"] = True
            raw["diff_output_preservation_class"] = tc.diff_output_preservation_class
        batch = self.reg.nonmember_rows(int(getattr(tc, "batch_size", 1) or 1))
        loader = get_dataloader([raw], batch, trainer.sd)
        if loader is None:
            raise SmploraError("ai-toolkit built no data loader for privacy.holdout_folder.")
        self.pool = ho.NonmemberPool(loader, self.reg.config.seed)

    def start_training(self, trainer: Any) -> None:
        """At the first step: the manifest, the progress bar's mia_* (every check has passed by now)."""
        if self.reg is not None and self.pool is None:
            raise SmploraError(f"{type(trainer).__name__} reached its first step without before_dataset_load(), "
                               "where the held-out dataset is built; this trainer is not supported.")
        if self.settings.dp is not None:
            resumed = 0 if self.dp_state is None else int(json.loads(self.dp_state["dp.meta"]).get("steps", 0))
            self.dp = dp_noise.start(trainer, self.settings, self.reg, self.dp_rows, self.dp_state)
            if self._is_main(trainer):
                print(summary_box(dp_noise.lines(self.settings, self.dp, resumed)), flush=True)
        self.started = True
        if self._is_main(trainer):
            seed = self.reg.config.seed if self.reg is not None else self.settings.dp.seed
            holdout = self.settings.holdout_folder
            ho.record(self.manifest, self.splits, seed=seed,
                      source=str(holdout) if holdout is not None else "no holdout folder (DP-SGD alone)")
            say(f"manifest written to {self.manifest}")
        bar = getattr(trainer, "progress_bar", None)
        if bar is not None and hasattr(bar, "set_postfix_str"):
            original = bar.set_postfix_str
            postfix = self.postfix

            def set_postfix_str(s: str = "", refresh: bool = True) -> Any:
                extra = " ".join(f"{k}: {v}" for k, v in postfix().items())
                return original(f"{s} {extra}" if extra and s else (extra or s), refresh)

            bar.set_postfix_str = set_postfix_str
        else:
            say("warning: ai-toolkit's progress bar was not found; it shows no mia_ce / mia_acc / eps")

    def postfix(self) -> Dict[str, Any]:
        """What the progress bar adds: ``mia_ce`` / ``mia_acc`` of the attacker, ``eps`` of the DP noise."""
        out = dict(self.reg.progress_postfix()) if self.reg is not None else {}
        if self.dp is not None:
            out.update(self.dp.postfix())
        return out

    # ------------------------------------------------------------------ one optimiser step
    def planned_last_rows(self, batches: Sequence[Any]) -> int:
        """The privacy rows the step's last batch will have (the core's schedule over this step's batches)."""
        step, rows = self.reg.global_step, 0
        for b in batches:
            m = len(member_rows(b))
            rows = 0
            if m:
                rows = self.reg.config.privacy_rows(m, step)
                step += 1
        return rows

    def begin_step(self, trainer: Any, batch: Any, heldout_forward: Callable[[Any], Any]) -> None:
        """Before ``hook_train_loop``: the held-out forward when this step's last batch updates the attacker."""
        if not self.started:
            self.start_training(trainer)
        batches = batch if isinstance(batch, list) else [batch]
        self.step_batches, self.batch_index, self.pending = len(batches), 0, None
        if self.reg is None:
            return
        sync = not bool(getattr(trainer, "is_grad_accumulation_step", False))
        if sync and self.planned_last_rows(batches) > 0 and self.reg.wants_nonmembers(update_attacker=True):
            self.pending = self.heldout_features(trainer, heldout_forward)

    def heldout_features(self, trainer: Any, heldout_forward: Callable[[Any], Any]) -> torch.Tensor:
        """Loss maps of the next held-out batch through the trainer's own forward (stopped before its backward)."""
        cfg = self.reg.config
        draw = self.reg.attacker_updates // cfg.nonmember_every
        device = getattr(trainer, "device_torch", None)
        outer, self.forward = self.forward, Forward("heldout")
        captured: Optional[torch.Tensor] = None
        try:
            with ho.forked_rng(cfg.seed * 7919 + draw, device), torch.no_grad():
                nm_batch = self.pool.batch(draw)
                try:
                    heldout_forward(nm_batch)
                except _HeldOutDone as done:
                    captured = done.args[0]
                finally:
                    if hasattr(nm_batch, "cleanup"):
                        nm_batch.cleanup()
        finally:
            self.forward = outer
        if captured is None:
            raise SmploraError("the held-out forward did not reach calculate_loss (this batch took another loss path "
                               "of SDTrainer, e.g. guided or mean-flow loss); the privacy term cannot run with it.")
        self.feature_rows["nonmember"] += int(captured.shape[0])
        return captured

    @contextmanager
    def member_forward(self, trainer: Any) -> Iterator[Forward]:
        """Around ``train_single_accumulation`` of a training batch: the forward to capture."""
        last = self.batch_index == self.step_batches - 1
        sync = last and not bool(getattr(trainer, "is_grad_accumulation_step", False))
        if self.dp is not None:
            self.dp.collect()      # the previous batch's backward is over: its per-sample gradients
        fw = self.forward = Forward("member", sync=sync)
        try:
            yield fw
        finally:
            self.forward = None
            self.batch_index += 1
        if self.reg is not None and not fw.done:
            raise SmploraError("a training batch did not reach calculate_loss (SDTrainer took another loss path: "
                               "guided loss for unconditional_path datasets, or mean_flow), so it carries no privacy "
                               "term; train it with type: sd_trainer, or without that dataset option.")

    def record(self, call: Dict[str, Any]) -> None:
        """The arguments (by name) of the open forward's primary ``predict_noise`` call."""
        if self.forward is not None:
            self.forward.call = call

    def calculate_loss(self, trainer: Any, loss_fn: Callable[[], torch.Tensor], predict: Callable[..., Any],
                       args: Mapping[str, Any]) -> torch.Tensor:
        """``SDTrainer.calculate_loss`` (``loss_fn``) of the open forward, with the privacy term; on a held-out
        forward its loss maps, then :class:`_HeldOutDone`."""
        fw = self.forward
        if fw is None:
            return loss_fn()
        if fw.done:
            raise SmploraError("calculate_loss ran twice in one forward; this SDTrainer path is not supported.")
        fw.done = True
        if self.reg is None:
            return loss_fn()       # DP-SGD alone: ai-toolkit's own loss, untouched
        pred, batch = args["noise_pred"], args["batch"]
        size = int(pred.shape[0])
        if len(getattr(batch, "file_items", None) or []) != size:
            raise SmploraError(f"the prediction has {size} rows but the batch {len(batch.file_items)} images (a "
                               "refiner or doubled captions?); the privacy term cannot pair rows with images.")
        if fw.kind == "heldout":
            raise _HeldOutDone(self._features(trainer, predict, args, list(range(size))).detach())
        loss = loss_fn()
        if self.dp is not None:
            return self._per_sample_loss(trainer, predict, args, loss)
        rows = member_rows(batch)
        if not rows:
            self.reg_only_batches += 1
            return loss
        rows = rows[: self.reg.privacy_rows(len(rows))]
        if not rows:
            return self.reg.step(loss, None, update_attacker=fw.sync, keep_loss_value=True)
        member = self._features(trainer, predict, args, rows)
        self.feature_rows["member"] += len(rows)
        nonmember = None
        if fw.sync and self.reg.wants_nonmembers(update_attacker=True):
            nonmember, self.pending = self.pending, None
            if nonmember is None:
                raise SmploraError("internal: the attacker is due an update but no held-out batch was drawn for it.")
        return self.reg.step(loss, member, nonmember, update_attacker=fw.sync, keep_loss_value=True)

    def _per_sample_loss(self, trainer: Any, predict: Callable[..., Any], args: Mapping[str, Any],
                         loss: torch.Tensor) -> torch.Tensor:
        """SMP-LoRA + DP noise: the batch's loss as the mean of each image's own SMP-LoRA term
        (:meth:`PrivacyRegularizer.step_per_sample`), so each per-sample gradient is that image's; its value stays
        ai-toolkit's loss (regularisation datasets are refused with DP noise, so every row is a member)."""
        fw = self.forward
        pred, batch = args["noise_pred"], args["batch"]
        size = int(pred.shape[0])
        if len(member_rows(batch)) != size:
            raise DPError("a batch with regularisation images reached SMP-LoRA + DP noise; remove is_reg datasets.")
        target = loss_target(trainer, args["noise"], batch, args.get("timesteps"), args.get("prior_pred"))
        losses = dp_noise.sample_losses(pred, target, loss)
        member = self._features(trainer, predict, args, list(range(size)))
        self.feature_rows["member"] += size
        nonmember = None
        if fw.sync and self.reg.wants_nonmembers(update_attacker=True):
            nonmember, self.pending = self.pending, None
            if nonmember is None:
                raise SmploraError("internal: the attacker is due an update but no held-out batch was drawn for it.")
        return self.reg.step_per_sample(losses, member, nonmember, update_attacker=fw.sync, keep_loss_value=True)

    def _features(self, trainer: Any, predict: Callable[..., Any], args: Mapping[str, Any],
                  rows: List[int]) -> torch.Tensor:
        pred, noise, batch = args["noise_pred"], args["noise"], args["batch"]
        timesteps = args.get("timesteps")
        size = int(pred.shape[0])
        target = loss_target(trainer, noise, batch, timesteps, args.get("prior_pred"))
        reference = None
        if self.reg.config.calibrated:
            if self.forward.call is None:
                raise SmploraError("calibrated features need the training forward's predict_noise(..., "
                                   "is_primary_pred=True) call, and this forward made none.")
            reference = base_prediction(trainer, predict, self.forward.call, rows, size)
        if rows != list(range(size)):
            idx = torch.tensor(rows, device=pred.device)
            pred, target = pred.index_select(0, idx), target.index_select(0, idx.to(target.device))
            if isinstance(timesteps, torch.Tensor) and timesteps.ndim and timesteps.shape[0] == size:
                timesteps = timesteps.index_select(0, idx.to(timesteps.device))
        return self.reg.features(pred, target, timesteps, reference=reference)

    def end_step(self, trainer: Any) -> None:
        """After ``hook_train_loop``: the metrics for ai-toolkit's logger (``additional_logs``); with DP noise, a
        first step whose hooks saw no backward (noise only: a network that applies its LoRA without calling its
        layers) stops the run."""
        self.pending = None
        if self.dp is not None and self.dp.dp.steps and self.dp.last_norms is None:
            raise DPError("the first DP step held no per-sample gradient: the hooks on the LoRA's lora_down / lora_up "
                          "layers saw no backward, so the step was noise only. This network does not call its LoRA "
                          "layers as modules (a merged or weight-space LoRA), so DP noise cannot train it here.")
        logs = getattr(trainer, "additional_logs", None)
        if isinstance(logs, dict):
            if self.reg is not None:
                logs.update({f"smplora/{k}": v for k, v in self.reg.metrics().items() if math.isfinite(v)})
            if self.dp is not None:
                logs.update({k: v for k, v in self.dp.metrics().items() if math.isfinite(v)})

    # ------------------------------------------------------------------ saves and resumes
    def file_metadata(self) -> Dict[str, str]:
        """The ``smplora.*`` header keys of a saved LoRA (next to ai-toolkit's own, which stay as they are)."""
        meta = (self.reg.file_metadata() if self.reg is not None
                else build_privacy_metadata(extra={"smplora.method": "dp-sgd"}))
        if self.dp is not None:
            meta.update(self.dp.file_metadata())
        meta["smplora.integration"] = INTEGRATION
        meta["smplora.data"] = json.dumps({
            "source": None if self.settings.holdout_folder is None else str(self.settings.holdout_folder),
            "counts": {k: len(v) for k, v in self.splits.items()},
            "manifest": f"{STATE_DIR}/{MANIFEST}", "feature_rows": self.feature_rows,
            "reg_only_batches": self.reg_only_batches, "resumed_from_step": self.resumed_from_step}, sort_keys=True)
        return meta

    def saved(self, trainer: Any, step: Optional[int]) -> None:
        """After ai-toolkit saved a checkpoint: the attacker state next to it (in ``_smplora/``); states whose
        checkpoint ai-toolkit has removed (``max_step_saves_to_keep``) are dropped."""
        if not self._is_main(trainer) or getattr(trainer, "network", None) is None:
            return
        name = trainer.job.name + ("_LoRA" if getattr(trainer, "named_lora", False) else "")
        stem = name + ("" if step is None else f"_{str(step).zfill(9)}")
        kept: List[Path] = []
        if self.reg is not None:
            path = state_path(self.save_root, stem)
            self.reg.save(path)
            kept.append(path)
            m = self.reg.metrics()
            say(f"attacker state saved to {path} (step {int(m['step'])}, {int(m['attacker_updates'])} attacker "
                "updates)")
        if self.dp is not None:
            path = dp_noise.write_state(self.dp, dp_noise.state_path(self.state_dir, stem))
            kept.append(path)
            say(f"DP state saved to {path} ({self.dp.summary()})")
        for suffix in (STATE_SUFFIX, dp_noise.DP_STATE_SUFFIX):
            for old in self.state_dir.glob(f"*{suffix}"):
                if old not in kept and not (self.save_root / f"{old.name[:-len(suffix)]}.safetensors").exists():
                    old.unlink(missing_ok=True)

    def resumed(self, trainer: Any, path: Any) -> None:
        """After ai-toolkit loaded the LoRA checkpoint ``path``: the attacker state (and DP state) saved with it, if
        it is one of this run's checkpoints (a ``pretrained_lora_path`` elsewhere is not). With DP noise its DP state
        is required: without it the accountant would start at step 0 for a LoRA already trained."""
        if not isinstance(path, (str, os.PathLike)):
            return
        path = Path(path)
        if path.parent.resolve() != self.save_root.resolve():
            return
        dp_file = dp_noise.state_path(self.state_dir, path.name)
        if self.settings.dp is not None:
            if not dp_file.is_file():
                raise DPError(f"ai-toolkit resumes {path}, which has no DP state ({dp_file}): the accountant would "
                              "start at step 0 and the epsilon would not count the steps that trained it. Resume a "
                              "checkpoint of a DP run, or move the checkpoints away (or rename the job) to start a "
                              "new run. Nothing was trained.")
            self.dp_state = dp_noise.read_state(dp_file)
            self.resumed_from = path.name
            say(f"DP state of {path.name} read from {dp_file}; continued at the first step")
        elif dp_file.is_file():
            say(f"warning: {path.name} was trained with DP noise and this process adds none, so the LoRA it "
                "continues is no longer covered by that run's epsilon")
        if self.reg is None or self.settings.attacker_state is not None:
            return
        state = state_path(self.save_root, path.name)
        if not state.is_file():
            say(f"warning: {path.name} has no attacker state ({state}); the proxy attacker starts from scratch")
            return
        self.load_state(state)
        self.resumed_from = path.name

    def load_state(self, state_file: Path) -> None:
        """Restore the attacker saved in ``state_file`` (refused, naming the keys, when saved with other settings)."""
        state = read_state(state_file)
        saved = config_from_state(state, state_file).algorithm_fields()
        mine = self.reg.config.algorithm_fields()
        differ = [k for k in mine if mine[k] != saved[k]]
        if differ:
            shown = ", ".join(f"{BLOCK}.{k}: saved {saved[k]!r}, this run {mine[k]!r}" for k in differ)
            raise StateError(f"the attacker state {state_file} was saved with other privacy settings ({shown}); use "
                             "the same settings to continue it. Nothing was trained.")
        self.reg.load_state_dict(state)
        self.resumed_from_step = self.reg.global_step
        say(f"attacker state restored from {state_file} (step {self.reg.global_step}, {self.reg.attacker_updates} "
            "attacker updates)")

    @staticmethod
    def _is_main(trainer: Any) -> bool:
        acc = getattr(trainer, "accelerator", None)
        return bool(getattr(acc, "is_main_process", True))
