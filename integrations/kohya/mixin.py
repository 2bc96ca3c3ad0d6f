"""``SmploraTrainerMixin``: SMP-LoRA, DP-SGD, or both, for any sd-scripts ``NetworkTrainer`` subclass.

Put it first in the MRO (``make_private_trainer`` / the launcher do that). It overrides only
methods every kohya network trainer shares, each calling ``super()`` with the arguments passed
through unchanged:

- ``train``: validate the privacy settings and prepare the non-member dataset, before anything else
  (:func:`.plan.plan_run`);
- ``assert_extra_args``: reach the dataset groups (members / non-members / regularisation), check
  that they are disjoint by content, announce the split (:func:`.plan.split_datasets`);
- ``post_process_network``: with calibrated features, check the network can be switched off
  (``set_multiplier``), right after kohya creates it;
- ``get_noise_pred_and_target``: capture ``(pred, target, timesteps)`` of a forward; with calibrated
  features, first replay the same call (same RNG draws, hence the same noisy latents and timesteps,
  same conditioning; the streams are restored afterwards) under ``no_grad`` with the LoRA at multiplier 0,
  the denoiser running on the privacy rows only: the base prediction (:mod:`.capture`);
- ``process_batch``: while training only, feed the core (``reg.features``, ``reg.step``) with the first
  ``reg.privacy_rows(m)`` of the batch's ``m`` member rows (``privacy_fraction`` over steps: 0 on some
  steps, then ``reg.step(loss, None)`` and no base forward), with one no-grad forward on a kohya validation
  batch cut to ``reg.nonmember_rows(its size)`` rows when the attacker is due an update;
- ``on_step_start``: at the first training step, every remaining check (with DP noise: ``DPTraining`` built on
  kohya's network, its saved state continued, attached to kohya's optimiser, :mod:`.dp_noise`), then the manifest
  is written and checkpoint / ``--save_state`` saving hooked up (:mod:`.checkpoints`);
- ``get_sai_model_spec``: ``smplora.*`` keys in every saved LoRA;
- ``generate_step_logs``: metrics for kohya's trackers (TensorBoard / wandb).

With DP noise (``--privacy dpsgd``: DP-SGD alone, kohya's own loss; ``--privacy smplora`` with
``--privacy_noise_multiplier``: each image's own SMP-LoRA term, ``reg.step_per_sample``), ``process_batch`` first
hands the previous backward's per-sample gradients to the core (``DPTraining.collect``); the optimiser's step
pre-hook then writes the clipped, noised gradient in place of kohya's.

What it reaches beyond these hooks (kohya's header dict, ``network.save_weights``, the dataset objects, the
progress bar...) is found, and changed, by :mod:`.reach` only, which stops a run whose sd-scripts lacks a piece
before its first training step and before anything is written.

All algorithm code lives in the core (:class:`smplora_plugin.PrivacyRegularizer`, :mod:`smplora_plugin.dp`).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from smplora_plugin import PrivacyRegularizer, distributed
from smplora_plugin.dp import DPTraining
from smplora_plugin.errors import SmploraError
from smplora_plugin.metadata import build_privacy_metadata

from .._common import summary_box
from . import data, dp_noise, plan, reach
from .capture import HOOK_ARGS, Capture, Captured, bind, lora_switch, switch_of
from .checkpoints import Checkpoints
from .options import KohyaPrivacySettings, settings_from_namespace

logger = logging.getLogger("smplora.kohya")


class _Run:
    """One private ``train()``: its set-up (:class:`.plan.Plan`, then :class:`.plan.Split` once kohya hands over
    its datasets), the captured forwards (:class:`.capture.Capture`), the saves (:class:`.checkpoints.Checkpoints`,
    from the first training step on), the DP noise (:class:`~smplora_plugin.dp.DPTraining`, the same), and what the
    privacy term consumed. ``reg`` is ``None`` for DP-SGD alone."""

    def __init__(self, settings: KohyaPrivacySettings, reg: Optional[PrivacyRegularizer], plan_: plan.Plan):
        self.settings = settings
        self.reg = reg
        self.dp: Optional[DPTraining] = None              # set at the first training step (DP noise only)
        self.plan = plan_
        self.split: Optional[plan.Split] = None
        self.capture = Capture(reg)
        self.checkpoints: Optional[Checkpoints] = None    # set at the first training step
        self.pool: Optional[data.NonmemberPool] = None    # the same
        self.feature_rows = {"member": 0, "nonmember": 0}   # samples that fed the privacy term in this run
        self.reg_only_batches = 0

    @property
    def capturing(self) -> bool:
        """Whether a forward is being captured now."""
        return self.capture.forward is not None

    def start_training(self, trainer: Any, bound: inspect.BoundArguments) -> None:
        """At the first training step: find every piece of kohya the shim still reaches into (:mod:`.reach`;
        refused before anything is written), build the DP noise on kohya's network and optimiser (refused the same
        way: another sigma in the resumed state, a target epsilon out of reach, a network without per-sample
        gradients), then write the records and hook up the state next to each checkpoint, the state in
        --save_state folders and the progress bar."""
        arg = bound.arguments
        acc, args = arg["accelerator"], arg["args"]
        split = self.split
        if split is None:
            raise SmploraError(f"{type(trainer).__name__} reached its first training step without calling "
                               "assert_extra_args(args, train_dataset_group, val_dataset_group), where SMP-LoRA "
                               "learns which images are members; this trainer class is not supported.")
        reg = self.reg
        if reg is not None and reg.config.calibrated:   # also for trainers without post_process_network
            switch_of(arg)
        saver = reach.network_saver(arg["network"], acc)
        if split.header_plan is not None:
            reach.check_header(reach.metadata_dict(trainer, self.plan.layout), split.header_plan)
        reach.batch_roles(arg["batch"], data.ROLE_KEY)
        register = reach.save_state_hook(acc, args)
        pool = None if reg is None else data.NonmemberPool(split.val_group, self.settings.seed,
                                                           rank=getattr(acc, "process_index", 0),
                                                           world_size=getattr(acc, "num_processes", 1))
        dpt = None
        if self.settings.dp is not None:
            dpt = dp_noise.start(self.settings, args, acc, saver.net, reg, split.train_rows, split.batch_per_device,
                                 self.plan.dp_state)
        saves = Checkpoints(reg, args, is_main=bool(getattr(acc, "is_main_process", True)),
                            num_processes=int(getattr(acc, "num_processes", 1) or 1), header_plan=split.header_plan,
                            dp=dpt)
        if saves.is_main:
            plan.write_records(self.plan, split)     # every check has passed: the first training step is about to run
        reach.wrap_save_weights(saver, saves.restore_header if split.header_plan is not None else None, saves.saved)
        if register is not None:
            register(saves.save_state_hook)
        shown = " / ".join((["mia_ce / mia_acc"] if reg is not None else []) + (["eps"] if dpt is not None else []))
        reach.add_to_progress_bar(acc, self.progress_postfix, shown)
        if dpt is not None:
            dp_noise.announce(self.settings, dpt, dpt.dp.steps)
        self.pool, self.checkpoints, self.dp = pool, saves, dpt

    def progress_postfix(self) -> Dict[str, str]:
        """What the progress bar adds: ``mia_ce`` / ``mia_acc`` of the attacker, ``eps`` of the DP noise."""
        out = dict(self.reg.progress_postfix()) if self.reg is not None else {}
        if self.dp is not None:
            out.update(self.dp.postfix())
        return out

    def regularize(self, trainer: Any, loss: torch.Tensor, bound: inspect.BoundArguments,
                   captured: Optional[Captured]) -> torch.Tensor:
        """The training loss of the batch of ``bound`` with the privacy term of its forward ``captured``."""
        if captured is None:
            raise SmploraError(
                f"{type(trainer).__name__}.process_batch did not call get_noise_pred_and_target, so SMP-LoRA has "
                "no prediction to regularise; this trainer class is not supported.")
        if self.dp is not None:
            return self.regularize_per_sample(trainer, loss, bound, captured)
        pred, target, timesteps, reference = captured[:4]
        batch = bound.arguments["batch"]
        sync = bool(getattr(bound.arguments["accelerator"], "sync_gradients", True))
        rows = data.member_rows(batch, pred.shape[0])
        rows = rows[: self.reg.privacy_rows(len(rows))] if rows else None   # the first n member rows (n may be 0)
        state = 0 if rows is None else 2 if rows else 1
        if distributed.is_active():   # every process must call reg.step together and alike (it gathers features)
            state = int(distributed.gather_rows(torch.tensor([[state]], device=pred.device)).min())
        if state == 0:   # a batch of regularisation / DOP images only, on some rank
            self.reg_only_batches += 1
            return loss
        if state == 1:   # no privacy row on this step (privacy_fraction over steps), on some rank: no features
            return self.reg.step(loss, None, update_attacker=sync, keep_loss_value=True)
        if len(rows) < pred.shape[0]:
            idx = torch.tensor(rows, device=pred.device)
            pred, target = pred.index_select(0, idx), target.index_select(0, idx)
            if reference is not None:
                reference = reference.index_select(0, idx.to(reference.device))
            if isinstance(timesteps, torch.Tensor) and timesteps.ndim > 0 and timesteps.shape[0] > max(rows):
                timesteps = timesteps.index_select(0, idx.to(timesteps.device))
        member = self.reg.features(pred, target, timesteps, reference=reference)
        self.feature_rows["member"] += len(rows)
        nonmember = None
        if sync and self.reg.wants_nonmembers(update_attacker=True):
            nonmember = self.nonmember_features(trainer, bound)
        # keep_loss_value: kohya's avr_loss keeps showing the denoising loss; the gradient is the regularised one's
        return self.reg.step(loss, member, nonmember, update_attacker=sync, keep_loss_value=True)

    def regularize_per_sample(self, trainer: Any, loss: torch.Tensor, bound: inspect.BoundArguments,
                              captured: Captured) -> torch.Tensor:
        """SMP-LoRA + DP noise: the batch's loss as a mean of per-image terms (the per-sample gradients are those
        of each image's own term): each member image's SMP-LoRA term (:meth:`PrivacyRegularizer.step_per_sample`),
        each regularisation / DOP image's own loss (it is never shown to the attacker, and a shared denominator
        would couple the images). Its value stays kohya's loss (the progress bar's avr_loss)."""
        pred, target, timesteps, reference, weighting = captured
        batch = bound.arguments["batch"]
        sync = bool(getattr(bound.arguments["accelerator"], "sync_gradients", True))
        size = int(pred.shape[0])
        losses = dp_noise.sample_losses(trainer, pred, target, weighting, batch, loss)
        rows = data.member_rows(batch, size)
        state = 1 if rows else 0
        if distributed.is_active():   # every process must call the regulariser together (it gathers features)
            state = int(distributed.gather_rows(torch.tensor([[state]], device=pred.device)).min())
        if state == 0:   # a batch of regularisation / DOP images only, on some rank: each image's own loss
            self.reg_only_batches += 1
            return loss
        idx = torch.tensor(rows, device=pred.device)
        if isinstance(timesteps, torch.Tensor) and timesteps.ndim > 0 and timesteps.shape[0] == size:
            timesteps = timesteps.index_select(0, idx.to(timesteps.device))
        if reference is not None:
            reference = reference.index_select(0, idx.to(reference.device))
        member = self.reg.features(pred.index_select(0, idx), target.index_select(0, idx), timesteps,
                                   reference=reference)
        self.feature_rows["member"] += len(rows)
        nonmember = None
        if sync and self.reg.wants_nonmembers(update_attacker=True):
            nonmember = self.nonmember_features(trainer, bound)
        terms = self.reg.step_per_sample(losses.index_select(0, idx), member, nonmember, update_attacker=sync,
                                         keep_loss_value=True) * len(rows)
        others = [i for i in range(size) if i not in set(rows)]
        if others:
            terms = terms + losses.index_select(0, torch.tensor(others, device=losses.device)).sum()
        total = terms / size
        return total + (loss - total).detach()

    def nonmember_features(self, trainer: Any, bound: inspect.BoundArguments) -> torch.Tensor:
        """One no-grad forward of the current model on a kohya validation (non-member) batch, cut to its first
        ``reg.nonmember_rows(size)`` samples (:func:`data.first_rows`), so that with calibrated features its base
        replay runs on those samples only."""
        a = bound.arguments
        acc = a["accelerator"]
        counter = self.reg.attacker_updates
        with data.forked_rng(self.settings.config.seed * 7919 + counter, getattr(acc, "device", None)), \
                torch.no_grad():
            nm_batch = self.pool.batch(counter)
            size = data.batch_rows(nm_batch)
            rows = None if size is None else self.reg.nonmember_rows(size)
            cut = rows is not None and rows < size
            if cut:
                nm_batch = data.first_rows(nm_batch, rows, size)
            hook_args = tuple(nm_batch if n == "batch" else a[n] for n in HOOK_ARGS)
            trainer.on_step_start(*hook_args, is_train=False)
            call = inspect.BoundArguments(bound.signature, {**a, "batch": nm_batch, "is_train": False})
            _, captured = self.capture.run(call.arguments, trainer.process_batch, *call.args, **call.kwargs)
            trainer.on_validation_step_end(*hook_args)
            if captured is None:
                raise SmploraError("the non-member forward did not reach get_noise_pred_and_target.")
            pred, target, timesteps, reference = captured[:4]
            if cut and pred.shape[0] != rows:
                raise SmploraError(
                    f"the non-member forward of {type(trainer).__name__} returned {pred.shape[0]} predictions for a "
                    f"batch cut to its first {rows} of {size} samples (privacy_fraction="
                    f"{self.settings.config.privacy_fraction:g}); the batch holds a per-sample entry that was not "
                    "cut. Use --privacy_fraction 1.")
            self.feature_rows["nonmember"] += int(pred.shape[0])
            return self.reg.features(pred, target, timesteps, reference=reference)

    def file_metadata(self) -> Dict[str, str]:
        """The ``smplora.*`` keys of a saved LoRA: the regulariser's (SMP-LoRA), ``smplora.dp`` (DP noise: epsilon,
        delta, sigma, clip, sampling...), the integration and the data."""
        if self.reg is not None:
            meta = self.reg.file_metadata()
        else:
            meta = build_privacy_metadata(extra={"smplora.method": "dp-sgd"})
        meta["smplora.integration"] = "kohya-sd-scripts"
        info: Dict[str, Any] = {"source": self.plan.source or ("validation" if self.reg is not None else "none"),
                                "counts": self.split.counts if self.split is not None else {},
                                "manifest": self.plan.manifest.name}
        if self.reg is not None:
            info.update(reg_only_batches=self.reg_only_batches, feature_rows=self.feature_rows,
                        resumed_from_step=self.plan.resumed_from_step)
        if self.dp is not None:
            meta.update(self.dp.file_metadata())
        meta["smplora.data"] = json.dumps(info, sort_keys=True)
        return meta


class SmploraTrainerMixin:
    """Mixin for kohya ``NetworkTrainer`` subclasses; must come first in the MRO."""

    _smplora_override: Optional[KohyaPrivacySettings] = None
    _smplora: Optional[_Run] = None

    # -------------------------------------------------------------- train
    def train(self, args, *rest, **kw):
        settings = self._smplora_override
        if settings is None:
            settings = settings_from_namespace(args)
        elif settings.holdout_dir is None and getattr(args, "privacy_holdout_dir", None):
            settings.holdout_dir = Path(args.privacy_holdout_dir)
        if not settings.enabled:
            self._smplora = None
            return super().train(args, *rest, **kw)
        reg = PrivacyRegularizer(config=settings.config) if settings.config is not None else None   # None: DP-SGD
        # the classes of this trainer below the mixin (kohya's, and any subclass of them)
        layout = reach.save_path([c for c in type(self).__mro__ if not issubclass(c, SmploraTrainerMixin)])
        run = _Run(settings, reg, plan.plan_run(settings, args, reg, layout))   # checks needing no dataset
        self._smplora = run
        try:
            out = super().train(args, *rest, **kw)
            if run.dp is not None and data.is_main_process():
                print(summary_box([f"DP noise after training: {run.dp.summary()}"]), flush=True)
            return out
        finally:
            run.plan.cleanup()
            if run.dp is not None:
                run.dp.detach()
            if run.reg_only_batches:
                logger.info(f"SMP-LoRA: {run.reg_only_batches} batch(es) held only regularisation images and "
                            "were trained without the privacy term")

    # -------------------------------------------------------------- hooks
    def assert_extra_args(self, args, train_dataset_group, val_dataset_group, *rest, **kw):
        out = super().assert_extra_args(args, train_dataset_group, val_dataset_group, *rest, **kw)
        run = self._smplora
        if run is not None:
            run.split = plan.split_datasets(run.plan, run.settings, args, train_dataset_group, val_dataset_group)
        return out

    def post_process_network(self, args, accelerator, network, *rest, **kw):
        run = self._smplora
        if run is not None:
            reach.network_saver(network, accelerator)       # right after kohya creates the network
            if run.reg is not None and run.reg.config.calibrated:
                lora_switch(network, accelerator, getattr(args, "network_module", None))
        parent = getattr(super(), "post_process_network", None)
        return None if parent is None else parent(args, accelerator, network, *rest, **kw)

    def get_noise_pred_and_target(self, *a, **kw):
        run = self._smplora
        call = super().get_noise_pred_and_target
        if run is None or not run.capturing:
            return call(*a, **kw)
        return run.capture.predict(self, call, a, kw)

    def process_batch(self, *a, **kw):
        run = self._smplora
        parent = super().process_batch
        if run is None:
            return parent(*a, **kw)
        bound = bind(parent, a, kw)
        is_train = bound.arguments.get("is_train", bound.signature.parameters["is_train"].default)
        if not is_train or run.capturing:
            return parent(*a, **kw)
        if run.settings.dp is not None:
            if run.dp is None:
                raise SmploraError(f"{type(self).__name__}.process_batch trained before on_step_start(..., "
                                   "is_train=True), where the DP noise is attached to kohya's optimiser; this trainer "
                                   "class is not supported with DP noise.")
            run.dp.collect()      # the previous micro-batch's backward is over: its per-sample gradients
            if run.reg is None:   # DP-SGD alone: kohya's own loss, untouched
                return parent(*a, **kw)
        loss, captured = run.capture.run(bound.arguments, parent, *a, **kw)
        return run.regularize(self, loss, bound, captured)

    def on_step_start(self, *a, **kw):
        out = super().on_step_start(*a, **kw)
        run = self._smplora
        if run is not None and run.checkpoints is None:
            bound = bind(super().on_step_start, a, kw)
            if bound.arguments.get("is_train", True):
                run.start_training(self, bound)
        elif run is not None and run.dp is not None and run.dp.dp.steps and run.dp.last_norms is None:
            raise SmploraError(
                "the first DP step held no per-sample gradient: the hooks on the LoRA's layers saw no backward, "
                "so the step was noise only. The network (--network_module "
                f"{getattr(bind(super().on_step_start, a, kw).arguments.get('args'), 'network_module', '?')}) "
                "must call its LoRA layers (lora_down / lora_up) as nn.Linear / nn.Conv2d modules in the forward, as "
                "sd-scripts' networks.lora does; this one does not, so DP noise cannot train it.")
        return out

    def get_sai_model_spec(self, *a, **kw):
        spec = super().get_sai_model_spec(*a, **kw)
        run = self._smplora
        if run is None:
            return spec
        spec = dict(spec or {})
        spec.update(run.file_metadata())
        return spec

    def generate_step_logs(self, *a, **kw):
        logs = super().generate_step_logs(*a, **kw)
        run = self._smplora
        if run is not None and isinstance(logs, dict):
            if run.reg is not None:
                logs.update({f"smplora/{k}": v for k, v in run.reg.metrics().items()})
            if run.dp is not None:
                logs.update(run.dp.metrics())
        return logs

    # -------------------------------------------------------------- access
    @property
    def privacy_regularizer(self) -> Optional[PrivacyRegularizer]:
        """The run's :class:`PrivacyRegularizer` (None before ``train()`` or with privacy off)."""
        return None if self._smplora is None else self._smplora.reg

    @property
    def privacy_dp(self) -> Optional[DPTraining]:
        """The run's :class:`~smplora_plugin.dp.DPTraining` (None before the first training step or without DP)."""
        return None if self._smplora is None else self._smplora.dp
