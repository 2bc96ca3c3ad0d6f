"""`PrivacyRegularizer`: the one object a user meets.

Per optimiser step (method.md, Algorithm 1): ``k_steps`` updates of the proxy attacker on
detached, balanced member / non-member features in fp32, then the adversarial term ``CE_m`` on
the members of the training forward with the updated attacker frozen, combined with the
trainer's loss as the SMP ratio (default) or the MP sum.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from . import state as state_io
from .attacker import ProxyAttacker, attacker_optimizer, load_optimizer_state, optimizer_state
from .config import PrivacyConfig
from .errors import FeatureError, StateError
from .features import flatten_features, pooled_size
from .metadata import annotate as _annotate
from .metadata import validate_entries
from .plugins import make_plugin_manager

PathLike = Union[str, "os.PathLike[str]"]

_METRIC_KEYS = (
    "adaptation_loss", "regularized_loss", "attacker_ce_member", "attacker_ce_nonmember", "attacker_acc",
    "attacker_loss", "denominator",
)


class PrivacyRegularizer:
    """SMP-LoRA / MP-LoRA regulariser that wraps any trainer's loss.

    Example::

        reg = PrivacyRegularizer(alpha=0.05)
        member = reg.features(pred, target)                  # from the training forward (with grad)
        with torch.no_grad():
            nonmember = reg.features(pred_nm, target_nm)     # a forward on held-out data
        loss = reg.step(loss, member, nonmember)
        loss.backward()

    Args:
        config: a :class:`PrivacyConfig`; keyword ``overrides`` are applied on top of it.
        plugins: explicit plugin objects; when given, installed entry points are not loaded.
        load_entry_points: load plugins of the ``smplora`` entry-point group on first use
            (default true; also off when ``SMPLORA_DISABLE_PLUGINS=1``).
        distributed: gather features across ``torch.distributed`` ranks; ``None`` = automatic
            (on when a process group with more than one rank is initialised).
        **overrides: any :class:`PrivacyConfig` field, e.g. ``alpha=1.0, attacker_lr=1e-3``.
    """

    def __init__(self, config: Optional[PrivacyConfig] = None, *, plugins: Optional[Iterable[object]] = None,
                 load_entry_points: bool = True, distributed: Optional[bool] = None, **overrides: Any):
        if config is None:
            config = PrivacyConfig.from_dict(overrides)
        else:
            if not isinstance(config, PrivacyConfig):
                config = PrivacyConfig.from_dict(config)
            if overrides:
                config = PrivacyConfig.from_dict({**config.to_dict(), **overrides})
        self.config: PrivacyConfig = config
        self._plugins = None if plugins is None else list(plugins)
        self._load_entry_points = load_entry_points
        self._pm = None
        self._distributed = distributed
        self.attacker: Optional[ProxyAttacker] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._generator: Optional[torch.Generator] = None
        self.global_step = 0          # calls of step()
        self.attacker_updates = 0     # calls that updated the attacker
        self.attacker_steps = 0       # optimiser steps of the attacker (k per update)
        self._last: Dict[str, torch.Tensor] = {}
        self._bank: Optional[torch.Tensor] = None  # last non-member features (detached)
        #: ``(h, w)`` the attacker's loss maps are pooled to: ``config.feature_grid`` capped at the first batch's
        #: map size, fixed from then on (saved in the state); ``None`` before the first batch or without pooling.
        self.input_grid: Optional[Tuple[int, int]] = None

    # ------------------------------------------------------------------ plugins
    @property
    def plugin_manager(self):
        """This regulariser's :class:`pluggy.PluginManager` (built, and entry points loaded, on first use)."""
        if self._pm is None:
            self._pm = make_plugin_manager(self._plugins, load_entry_points=self._load_entry_points)
        return self._pm

    @property
    def hook(self):
        return self.plugin_manager.hook

    # ------------------------------------------------------------------ features
    def features(self, pred: torch.Tensor, target: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                 reference: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attacker features of a batch: per-sample loss maps pooled to :attr:`input_grid`, ``(B, D)`` fp32.

        The first batch fixes :attr:`input_grid` (``config.feature_grid``, capped at its maps' size: maps are
        never pooled up); maps of later batches of another size (buckets) are pooled to that same grid (a
        later map smaller than it on a side, i.e. a bucket below the grid, has its cells repeated to fit).

        Dispatched through the ``smplora_extract_features`` hook (first result wins). Keeps the
        graph of ``pred``: call it on the training forward's prediction for members, and under
        ``torch.no_grad()`` on a held-out forward for non-members. With ``calibrated=True`` pass
        ``reference``, the base model's prediction (LoRA disabled, no grad) at the same input.
        """
        if self.config.calibrated and reference is None:
            raise FeatureError(
                "this regulariser has calibrated=True, so reg.features needs reference=, the base model's "
                "prediction at the same noisy input with the LoRA disabled (e.g. under torch.no_grad() with "
                "unet.disable_adapters()); or construct it with calibrated=False."
            )
        if not self.config.calibrated and reference is not None:
            raise FeatureError("reference= was given but calibrated=False: set calibrated=True to use base-calibrated "
                               "features, or drop reference= (member and non-member features must match).")
        feats = self.hook.smplora_extract_features(reg=self, pred=pred, target=target, timesteps=timesteps,
                                                   reference=reference)
        if feats is None:
            raise FeatureError("no plugin returned features for this batch (smplora_extract_features gave None).")
        return self._flatten(feats, "features", fix=True)

    # ------------------------------------------------------------------ main entry point
    def step(self, loss: torch.Tensor, member_feats: Optional[torch.Tensor],
             nonmember_feats: Optional[torch.Tensor] = None, *, update_attacker: bool = True,
             keep_loss_value: bool = False) -> torch.Tensor:
        """Update the attacker (``k_steps``), then return the regularised loss.

        Args:
            loss: the trainer's scalar adaptation loss (after its own weighting).
            member_feats: loss maps or features of the forward that produced ``loss`` (with grad), on
                its first :meth:`privacy_rows` samples; ``None`` when that count is 0 (``privacy_fraction``
                taken over steps): then nothing is updated and the loss is combined with the last
                step's member CE, detached (smp: ``loss / (beta + alpha * CE_last + delta)``, so every
                step's adaptation gradient has the same scale; mp: ``loss - alpha * CE_last``). The
                step counter still advances, which drives the schedule.
            nonmember_feats: features of a no-grad forward on held-out data; needed when the
                attacker is updated.
            update_attacker: ``False`` skips the attacker update (e.g. on gradient-accumulation
                micro-steps; pass ``accelerator.sync_gradients``).
            keep_loss_value: return :meth:`keep_loss_value` of the result: the value of ``loss``
                (so a trainer's loss display and trackers keep showing its denoising loss) with
                the gradient of the regularised loss. The regularised value stays in
                ``metrics()["regularized_loss"]``.
        Returns:
            ``loss / (beta + alpha * CE_m + delta)`` (smp) or ``loss - alpha * CE_m`` (mp).
        """
        # ---- validate everything before any state changes
        if not isinstance(loss, torch.Tensor):
            raise FeatureError(f"loss must be a torch.Tensor, got {type(loss).__name__}.")
        if loss.numel() != 1 or loss.ndim > 1:
            raise FeatureError(
                f"loss must be a scalar (the batch mean the trainer backpropagates), got shape {tuple(loss.shape)}; "
                "reduce it with .mean() first."
            )
        if not torch.isfinite(loss.detach()).all():
            raise FeatureError(f"loss is {loss.item()}: the trainer's loss is not finite; "
                               "fix the model/lr before regularising.")
        if member_feats is None:
            return self._step_without_members(loss, nonmember_feats, keep_loss_value)
        member, nonmember = self._validated_pair(member_feats, nonmember_feats)
        do_update = self._check_update(loss, member, nonmember, update_attacker)

        # ---- state changes from here on
        member = self._apply_update(member_feats, member, nonmember, do_update)
        ce_m = self._member_ce(member)
        ada = loss.float()
        if self._is_distributed():
            ada, ce_m, scale = dist_utils.global_terms(ada, ce_m, member.shape[0])
        else:
            scale = None
        out, denominator = self._combine(ada, ce_m)
        if scale is not None:  # value of the global loss, gradient scaled for the ranks' averaging
            out = out * scale - (scale - 1) * out.detach()
        return self._finish(out, loss, ada, ce_m, denominator, keep_loss_value)

    def step_per_sample(self, losses: torch.Tensor, member_feats: torch.Tensor,
                        nonmember_feats: Optional[torch.Tensor] = None, *, update_attacker: bool = True,
                        keep_loss_value: bool = False) -> torch.Tensor:
        """:meth:`step` for DP noise: the objective as a mean of per-sample terms, so that a per-sample gradient
        is the gradient of that sample's own term (:mod:`smplora_plugin.dp`, ``docs/dp.md``).

        Each of the ``B`` samples gets ``l_i / (beta + alpha CE_i + delta)`` (smp) or ``l_i - alpha CE_i`` (mp),
        ``CE_i`` the frozen attacker's member cross-entropy on its own features; the result is their mean.
        (The batch ratio of :meth:`step` couples the samples through its denominator, so one sample's data would
        rescale every other sample's clipped gradient.) Every row is a privacy row: ``privacy_fraction`` does not
        apply. The attacker is updated first, as in :meth:`step`.

        Args:
            losses: ``(B,)`` per-sample adaptation losses of the forward (with grad); their mean is the trainer's loss.
            member_feats: ``reg.features(pred, target)`` of the same ``B`` rows (with grad).
            nonmember_feats, update_attacker, keep_loss_value: as in :meth:`step` (the kept value is ``losses.mean()``).
        """
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or losses.numel() == 0:
            raise FeatureError(f"losses must be the (B,) per-sample losses of the batch, got "
                               f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__};"
                               " reduce each sample's loss map to one value (e.g. .mean(dim=(1, 2, 3))).")
        if not torch.isfinite(losses.detach()).all():
            raise FeatureError("a per-sample loss is not finite: fix the model/lr before regularising.")
        member, nonmember = self._validated_pair(member_feats, nonmember_feats)
        if member.shape[0] != losses.shape[0]:
            raise FeatureError(f"member_feats has {member.shape[0]} rows but losses has {losses.shape[0]}: under DP "
                               "noise every sample of the batch needs its features (privacy_fraction does not apply).")
        do_update = self._check_update(losses, member, nonmember, update_attacker)
        # ---- state changes from here on
        member = self._apply_update(member_feats, member, nonmember, do_update)
        logits = self._frozen_logits(member)
        ce = F.cross_entropy(logits, torch.ones(member.shape[0], dtype=torch.long, device=member.device),
                             reduction="none")
        ada = losses.float().to(ce.device)
        terms, denominators = self._combine(ada, ce)
        loss = losses.mean()
        out = terms.mean()
        return self._finish(out, loss, ada.mean(), ce.mean(), denominators.mean(), keep_loss_value)

    def _check_update(self, loss: torch.Tensor, member: torch.Tensor, nonmember: Optional[torch.Tensor],
                      update_attacker: bool) -> bool:
        """Whether this step updates the attacker; refuses features without gradient and a missing held-out batch
        (no state changes)."""
        if loss.requires_grad and not member.requires_grad:
            raise FeatureError(
                "member_feats carries no gradient but loss does: compute it from the same forward as loss "
                "(reg.features(pred, target) without torch.no_grad() or .detach()), or the defense cannot act."
            )
        do_update = bool(update_attacker) and self.config.k_steps > 0
        if nonmember is None and do_update and self.wants_nonmembers():
            raise FeatureError(
                "nonmember_feats is None but the attacker is due an update with fresh non-member features "
                "(see reg.wants_nonmembers()): pass features of a held-out batch, or update_attacker=False on "
                "steps that skip the attacker update."
            )
        return do_update

    def _apply_update(self, member_feats: Any, member: torch.Tensor, nonmember: Optional[torch.Tensor],
                      do_update: bool) -> torch.Tensor:
        """Fix the grid, build the attacker, refresh the held-out bank and run the attacker update when due;
        returns the member features on the attacker's device."""
        self._fix_grid(member_feats)
        self._ensure_attacker(member.shape[1], member.device)
        member = member.to(self._device)
        if nonmember is not None:
            self._bank = nonmember.to(self._device)
        if do_update:
            self._update_attacker(member.detach(), self._bank)
        return member

    def _combine(self, ada: torch.Tensor, ce_m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.objective == "smp":
            denominator = cfg.beta + cfg.alpha * ce_m + cfg.delta
            return ada / denominator, denominator
        return ada - cfg.alpha * ce_m, torch.ones_like(ce_m)

    def _step_without_members(self, loss: torch.Tensor, nonmember_feats: Any, keep_loss_value: bool) -> torch.Tensor:
        """:meth:`step` on a batch with no privacy row: the last member CE, detached; nothing else changes."""
        if nonmember_feats is not None:
            raise FeatureError("nonmember_feats was given without member_feats: a step with no privacy rows "
                               "(reg.privacy_rows(batch) == 0) updates no attacker, so draw no held-out batch on it.")
        last = self._last.get("attacker_ce_member")
        if last is None:
            raise FeatureError("member_feats is None on the first step: the first batch always has privacy rows "
                               "(reg.privacy_rows(batch) >= 1 at step 0); pass reg.features(...) of them.")
        ada = loss.float()
        ce_m = last.detach().to(ada.device)
        out, denominator = self._combine(ada, ce_m)
        return self._finish(out, loss, ada, ce_m, denominator, keep_loss_value)

    def _finish(self, out: torch.Tensor, loss: torch.Tensor, ada: torch.Tensor, ce_m: torch.Tensor,
                denominator: torch.Tensor, keep_loss_value: bool) -> torch.Tensor:
        out = out.to(loss.dtype).reshape(loss.shape)
        self.global_step += 1
        self._last.update(adaptation_loss=ada.detach(), regularized_loss=out.detach().float(),
                          attacker_ce_member=ce_m.detach(), denominator=denominator.detach())
        self.hook.smplora_after_regularize(reg=self, step=self.global_step, adaptation_loss=ada.detach(),
                                           member_ce=ce_m.detach(), denominator=denominator.detach(), loss=out)
        if self.hook.smplora_on_metrics.get_hookimpls():
            self.hook.smplora_on_metrics(reg=self, step=self.global_step, metrics=self.metrics())
        return self.keep_loss_value(out, loss) if keep_loss_value else out

    @staticmethod
    def keep_loss_value(regularized: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``regularized + (loss - regularized).detach()``: the value of ``loss`` (exactly) with the
        gradient of ``regularized``.

        Backpropagating it trains exactly as backpropagating ``regularized`` (also when scaled by a
        ``GradScaler`` or divided for gradient accumulation, both linear), while everything that
        reads its value (``loss.item()``, kohya's ``avr_loss``, the diffusers scripts' ``step_loss`` /
        ``train_loss``) still reads the trainer's own denoising loss, not the SMP ratio.
        """
        if not isinstance(regularized, torch.Tensor) or not isinstance(loss, torch.Tensor):
            raise FeatureError("keep_loss_value needs two tensors: the regularised loss and the trainer's loss.")
        if regularized.shape != loss.shape:
            raise FeatureError(f"keep_loss_value: the regularised loss has shape {tuple(regularized.shape)} but the "
                               f"trainer's loss has {tuple(loss.shape)}; pass the loss that reg.step regularised.")
        # (r - r.detach()) is exactly 0 in value, so the value is exactly the trainer's loss
        return (regularized - regularized.detach()) + loss.detach().to(regularized.dtype)

    def wants_nonmembers(self, update_attacker: bool = True) -> bool:
        """Whether the next :meth:`step` needs fresh non-member features.

        True when the attacker is due an update and the non-member bank is empty or due a
        refresh (every ``nonmember_every`` updates). Integrations skip the held-out forward
        when it is False, which is how the extra forward is amortised.
        """
        if not update_attacker or self.config.k_steps == 0:
            return False
        return self._bank is None or self.attacker_updates % self.config.nonmember_every == 0

    def privacy_rows(self, batch_size: int) -> int:
        """How many leading samples of this step's batch of ``batch_size`` feed the privacy term.

        :meth:`PrivacyConfig.privacy_rows` at :attr:`global_step` (the ``privacy_fraction`` taken over
        steps: ``ceil((k+1) f B) - ceil(k f B)``, no random draw; a resumed run continues the schedule):
        integrations compute the member features (and, when calibrated, the base forward) on
        ``batch[:n]`` only, and when ``n`` is 0 call ``step(loss, None)`` with no forward at all.
        Call it before :meth:`step`, which advances the step.
        """
        return self.config.privacy_rows(batch_size, self.global_step)

    def nonmember_rows(self, batch_size: int) -> int:
        """Size of a held-out batch for training batches of ``batch_size``: ``ceil(privacy_fraction * batch_size)``,
        at least 1 (:meth:`PrivacyConfig.nonmember_rows`)."""
        return self.config.nonmember_rows(batch_size)

    def update_attacker(self, member_feats: torch.Tensor, nonmember_feats: torch.Tensor) -> None:
        """Run the ``k_steps`` attacker updates alone (features are detached)."""
        member, nonmember = self._validated_pair(member_feats, nonmember_feats, require_nonmember=True)
        member = member.detach()
        if self.config.k_steps == 0:
            return
        self._fix_grid(member_feats)
        self._ensure_attacker(member.shape[1], member.device)
        self._bank = nonmember.to(self._device)
        self._update_attacker(member.to(self._device), self._bank)

    def member_ce(self, member_feats: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the frozen attacker on members (label 1); differentiable in the features."""
        member = self._validated(member_feats, "member_feats")
        self._fix_grid(member_feats)
        self._ensure_attacker(member.shape[1], member.device)
        return self._member_ce(member.to(self._device))

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """The frozen attacker's member logit margin per sample (higher = looks more like a member)."""
        x = self._validated(feats, "feats").detach()
        self._fix_grid(feats)
        self._ensure_attacker(x.shape[1], x.device)
        with torch.no_grad():
            logits = self._frozen_logits(x.to(self._device))
        return logits[:, 1] - logits[:, 0]

    # ------------------------------------------------------------------ metrics & metadata
    def metrics(self) -> Dict[str, float]:
        """Latest values as Python floats (for ``accelerator.log``, TensorBoard, progress bars)."""
        out = {key: float(self._last[key]) for key in _METRIC_KEYS if key in self._last}
        out.update(step=float(self.global_step), attacker_updates=float(self.attacker_updates),
                   attacker_steps=float(self.attacker_steps))
        return out

    def progress_postfix(self, ce_label: str = "mia_ce", acc_label: str = "mia_acc") -> Dict[str, str]:
        """A compact dict for a progress bar: the attacker's member CE and balanced accuracy."""
        m = self.metrics()
        out = {}
        if "attacker_ce_member" in m:
            out[ce_label] = f"{m['attacker_ce_member']:.3f}"
        if "attacker_acc" in m:
            out[acc_label] = f"{m['attacker_acc']:.2f}"
        return out

    def file_metadata(self) -> Dict[str, str]:
        """``smplora.*`` header entries: version, method, config, metrics and plugins' extras."""
        entries: Dict[str, str] = {}
        for result in reversed(self.hook.smplora_file_metadata(reg=self, config=self.config, metrics=self.metrics())):
            if result:
                entries.update(validate_entries(result))
        return entries

    def annotate(self, lora_path: PathLike, extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Write :meth:`file_metadata` (plus ``extra``) into an existing LoRA ``.safetensors`` file."""
        entries = self.file_metadata()
        if extra:
            entries.update(validate_entries(extra))
        return _annotate(lora_path, entries=entries)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Union[torch.Tensor, str]]:
        """The whole training state, flat, in the layout of a state file (:data:`STATE_FORMAT`).

        Tensors (CPU copies): ``attacker.<name>`` (fp32 weights), ``optimizer.<index>.<key>`` (Adam's moments
        and step), ``rng.attacker`` (the dropout generator) and ``bank.nonmember`` (the non-member features in
        use). JSON strings: ``meta.format``, ``meta.config``, ``meta.counters``, ``meta.last`` (the latest
        metrics), ``meta.input_grid``, ``meta.attacker`` (``in_features`` and device; ``null`` before the first
        batch, and then no tensor is saved) and ``meta.optimizer`` (param groups, non-tensor state, indices).
        """
        sd: Dict[str, Union[torch.Tensor, str]] = {
            "meta.format": STATE_FORMAT,
            "meta.config": self.config.to_json(),
            "meta.counters": json.dumps({"global_step": self.global_step, "attacker_updates": self.attacker_updates,
                                         "attacker_steps": self.attacker_steps}),
            "meta.last": json.dumps({k: float(v) for k, v in self._last.items()}, sort_keys=True),
            "meta.attacker": json.dumps(None),
            "meta.input_grid": json.dumps(None if self.input_grid is None else list(self.input_grid)),
        }
        if self.attacker is None:
            return sd
        sd["meta.attacker"] = json.dumps({"in_features": self.attacker.in_features, "device": str(self._device)})
        sd.update({f"attacker.{k}": v.detach().cpu().clone() for k, v in self.attacker.state_dict().items()})
        tensors, meta = optimizer_state(self.optimizer)
        sd.update({f"optimizer.{k}": v for k, v in tensors.items()})
        sd["meta.optimizer"] = json.dumps(meta)
        sd["rng.attacker"] = self._generator.get_state().clone()
        if self._bank is not None:
            sd["bank.nonmember"] = self._bank.detach().cpu().clone()
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (or :func:`smplora_plugin.state.read_state` of a state file).

        Checked whole before anything changes: the format version, the config (the fields that differ from
        this regulariser's are named), every key, tensor shape and dtype, the counters, the optimiser and RNG
        states. A refused state raises :class:`StateError` and leaves the regulariser as it was; a loaded one
        shares no tensor with ``state``.
        """
        new = _restored(state, self.config)
        self.attacker, self.optimizer, self._generator = new.attacker, new.optimizer, new.generator
        self._bank, self._last, self.input_grid = new.bank, new.last, new.input_grid
        self.global_step, self.attacker_updates, self.attacker_steps = new.counters

    def save(self, path: PathLike) -> None:
        """Save :meth:`state_dict` to a ``.safetensors`` file (atomic; no pickle)."""
        state_io.save_state(self.state_dict(), path)

    @classmethod
    def load(cls, path: PathLike, *, device: Optional[str] = None, **kwargs: Any) -> "PrivacyRegularizer":
        """A regulariser restored from :meth:`save` output, with the saved config."""
        state = state_io.read_state(path)
        config = saved_config(state, path)
        if device is not None:
            config = config.replace(device=device)
        reg = cls(config, **kwargs)
        reg.load_state_dict(state)
        return reg

    # ------------------------------------------------------------------ internals
    @property
    def _device(self) -> torch.device:
        return self.attacker.layers[0].weight.device

    def _is_distributed(self) -> bool:
        if self._distributed is None:
            return dist_utils.is_active()
        return bool(self._distributed)

    def _grid_for(self, feats: Any) -> Optional[Tuple[int, int]]:
        """The grid ``feats`` are pooled to: the fixed :attr:`input_grid`, else the config grid capped at their size."""
        grid = self.config.feature_grid
        if grid is None or not isinstance(feats, torch.Tensor) or feats.ndim != 4:
            return None
        return self.input_grid if self.input_grid is not None else pooled_size(feats.shape[-2:], grid)

    def _fix_grid(self, feats: Any) -> None:
        if self.input_grid is None:
            self.input_grid = self._grid_for(feats)

    def _flatten(self, feats: Any, name: str, fix: bool = False) -> torch.Tensor:
        x = flatten_features(feats, self._grid_for(feats), name)
        if fix:
            self._fix_grid(feats)
        return x

    def _validated(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        """Flat fp32 ``(B, D)`` features, checked for size against the attacker and for finiteness."""
        x = self._flatten(feats, name)
        self._check_dim(x.shape[1], name)
        _check_finite(x, name)
        return x

    def _validated_pair(self, member_feats, nonmember_feats, *, require_nonmember: bool = False):
        """Validated member features and detached non-member features (or ``None``) of equal width."""
        member = self._validated(member_feats, "member_feats")
        if nonmember_feats is None:
            if require_nonmember:
                raise FeatureError("nonmember_feats is None: the attacker update needs features of a held-out batch.")
            return member, None
        nonmember = self._flatten(nonmember_feats, "nonmember_feats").detach()
        if nonmember.shape[1] != member.shape[1]:
            raise FeatureError(
                f"nonmember_feats has {nonmember.shape[1]} features per sample but member_feats has "
                f"{member.shape[1]}: compute both with reg.features (same pooling grid and latent channels)."
            )
        _check_finite(nonmember, "nonmember_feats")
        return member, nonmember

    def _check_dim(self, dim: int, name: str) -> None:
        if self.attacker is not None and dim != self.attacker.in_features:
            fix = ("set feature_grid=(h, w) so loss maps of every size are pooled to one size"
                   if self.config.feature_grid is None else
                   f"keep the same latent channel count for the whole run (pooling to the input grid "
                   f"{self.input_grid} fixes only H and W)")
            raise FeatureError(
                f"{name} has {dim} features per sample but the attacker was built for "
                f"{self.attacker.in_features}: {fix}."
            )

    def _ensure_attacker(self, in_features: int, device: torch.device) -> None:
        if self.attacker is not None:
            return
        cfg = self.config
        device = torch.device(cfg.device) if cfg.device is not None else device
        self.attacker = ProxyAttacker(in_features, cfg.hidden, cfg.dropout, seed=cfg.seed).to(device)
        self.optimizer = attacker_optimizer(self.attacker, cfg.attacker_lr, cfg.attacker_weight_decay)
        self._generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    def _frozen_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Attacker logits in eval mode with detached parameters (no grad reaches the attacker)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.attacker.frozen(x.float())

    def _member_ce(self, member: torch.Tensor) -> torch.Tensor:
        logits = self._frozen_logits(member)
        labels = torch.ones(member.shape[0], dtype=torch.long, device=member.device)
        return F.cross_entropy(logits, labels)

    def _update_attacker(self, member: torch.Tensor, nonmember: torch.Tensor) -> None:
        if self._is_distributed():
            member, nonmember = dist_utils.gather_rows(member), dist_utils.gather_rows(nonmember)
        self.hook.smplora_before_attacker_update(reg=self, step=self.global_step, member_feats=member,
                                                 nonmember_feats=nonmember)
        x = torch.cat([member, nonmember])
        y = torch.cat([torch.ones(len(member), dtype=torch.long, device=x.device),
                       torch.zeros(len(nonmember), dtype=torch.long, device=x.device)])
        # balanced log-likelihood: each class weighs 1/2 whatever the batch sizes
        w = torch.cat([torch.full((len(member),), 0.5 / len(member), dtype=torch.float32, device=x.device),
                       torch.full((len(nonmember),), 0.5 / len(nonmember), dtype=torch.float32, device=x.device)])
        self.attacker.train()
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            for _ in range(self.config.k_steps):
                logits = self.attacker(x, generator=self._generator)
                loss = (F.cross_entropy(logits, y, reduction="none") * w).sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.attacker_steps += 1
            self.optimizer.zero_grad(set_to_none=True)  # don't hold D x hidden gradients between steps
        self.attacker.eval()
        with torch.no_grad():
            logits = self._frozen_logits(x)
            ce = F.cross_entropy(logits, y, reduction="none")
            correct = (logits.argmax(1) == y).float()
            n_m = len(member)
            acc = 0.5 * (correct[:n_m].mean() + correct[n_m:].mean())
        self.attacker_updates += 1
        self._last.update(attacker_loss=loss.detach(), attacker_ce_nonmember=ce[n_m:].mean(), attacker_acc=acc)
        self.hook.smplora_after_attacker_update(reg=self, step=self.global_step, attacker_loss=loss.detach(),
                                                attacker_accuracy=acc)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x.detach()).all():
        raise FeatureError(f"{name} contains NaN or Inf: the model's forward diverged or the loss map was computed "
                           "from non-finite values; check the learning rate / mixed-precision settings.")


# ---------------------------------------------------------------------- state layout
STATE_FORMAT = state_io.FORMAT_PREFIX + "1"
_COUNTERS = ("global_step", "attacker_updates", "attacker_steps")
_META_KEYS = {"meta.format", "meta.config", "meta.counters", "meta.last", "meta.attacker", "meta.input_grid"}


class _Restored(NamedTuple):
    """What :meth:`PrivacyRegularizer.load_state_dict` assigns, built and checked first."""

    attacker: Optional[ProxyAttacker]
    optimizer: Optional[torch.optim.Optimizer]
    generator: Optional[torch.Generator]
    bank: Optional[torch.Tensor]
    last: Dict[str, torch.Tensor]
    input_grid: Optional[Tuple[int, int]]
    counters: Tuple[int, int, int]


def saved_config(state: Mapping[str, Any], source: Any = "state") -> PrivacyConfig:
    """The config ``state`` was saved with; a state of another format version is refused, naming the fix."""
    fmt = state.get("meta.format") if isinstance(state, Mapping) else None
    if fmt != STATE_FORMAT:
        if isinstance(fmt, str) and fmt.startswith(state_io.FORMAT_PREFIX):
            raise StateError(f"{source} has state format {fmt!r}, but this smplora-plugin reads {STATE_FORMAT!r}: "
                             "resume it with the smplora-plugin release that wrote it (pip install -U smplora-plugin "
                             "if that one is newer), or start a new attacker without it.")
        raise StateError(f"{source} is not a smplora regulariser state (expected meta.format={STATE_FORMAT!r}).")
    try:
        return PrivacyConfig.from_dict(json.loads(state["meta.config"]))
    except (KeyError, TypeError, ValueError) as exc:   # ConfigError is a ValueError
        raise StateError(f"{source} holds an invalid config ({exc}); re-save it with reg.save().") from exc


def _restored(state: Mapping[str, Any], config: PrivacyConfig) -> _Restored:
    """Build everything a load assigns from ``state``, checking each entry; raises :class:`StateError`."""
    saved = saved_config(state)
    mine, theirs = config.algorithm_fields(), saved.algorithm_fields()
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        details = ", ".join(f"{k}: saved {theirs[k]!r} vs this {mine[k]!r}" for k in diff)
        raise StateError(
            f"the state was saved with a different config ({details}). Load it with PrivacyRegularizer.load(path) "
            "to get the saved config, or construct the regulariser with the same settings."
        )
    info = _json(state, "meta.attacker")
    _check_entries(state, has_attacker=info is not None)
    counters = _saved_counters(state)
    last = _saved_last(state)
    input_grid = _input_grid(state.get("meta.input_grid", "null"))
    if info is None:
        return _Restored(None, None, None, None, _tensors(last, torch.device("cpu")), input_grid, counters)

    in_features, device = _attacker_info(info, config)
    if input_grid is not None and in_features % (input_grid[0] * input_grid[1]):
        raise StateError(f"the state's input grid {input_grid} does not divide its attacker input size "
                         f"{in_features}; the file is corrupt.")
    attacker = ProxyAttacker(in_features, config.hidden, config.dropout, seed=config.seed)
    attacker.load_state_dict(_attacker_weights(state, attacker, config))
    attacker.to(device)
    optimizer = attacker_optimizer(attacker, config.attacker_lr, config.attacker_weight_decay)
    moments = {k[len("optimizer."):]: v for k, v in state.items() if k.startswith("optimizer.")}
    load_optimizer_state(optimizer, moments, _json(state, "meta.optimizer"))
    generator = _saved_generator(state.get("rng.attacker"), device)
    bank = _saved_bank(state.get("bank.nonmember"), in_features, device)
    return _Restored(attacker, optimizer, generator, bank, _tensors(last, device), input_grid, counters)


def _json(state: Mapping[str, Any], key: str, default: Optional[str] = None) -> Any:
    raw = state.get(key, default)
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as exc:
        what = "is missing" if raw is None else f"is not a JSON string ({exc})"
        raise StateError(f"the state's {key} {what}; the file is corrupt or not from reg.save(): re-save it.") from exc


def _check_entries(state: Mapping[str, Any], has_attacker: bool) -> None:
    """Every key is one this version writes, with a JSON string (``meta.*``) or a tensor (the rest)."""
    tensor_prefixes = ("attacker.", "optimizer.") if has_attacker else ()
    tensor_keys = {"rng.attacker", "bank.nonmember"} if has_attacker else set()
    meta_keys = _META_KEYS | ({"meta.optimizer"} if has_attacker else set())
    unexpected, wrong_type = [], []
    for key, value in state.items():
        if key in meta_keys:
            wrong_type += [] if isinstance(value, str) else [key]
        elif key in tensor_keys or (isinstance(key, str) and key.startswith(tensor_prefixes)):
            wrong_type += [] if isinstance(value, torch.Tensor) else [key]
        else:
            unexpected.append(str(key))
    if unexpected:
        none = " (the state has no attacker: meta.attacker is null)" if not has_attacker else ""
        raise StateError(f"unexpected state entries {sorted(unexpected)}{none}: a regulariser state holds "
                         "meta.*, attacker.*, optimizer.*, rng.attacker and bank.nonmember only; remove the others "
                         "(e.g. a shim's own entries) before load_state_dict.")
    if wrong_type:
        raise StateError(f"state entries {sorted(wrong_type)} have the wrong type: meta.* entries are JSON strings "
                         "and the others tensors; pass reg.state_dict() or read_state(path) output unchanged.")


def _saved_counters(state: Mapping[str, Any]) -> Tuple[int, int, int]:
    counters = _json(state, "meta.counters")
    values = tuple(counters.get(k) for k in _COUNTERS) if isinstance(counters, dict) else ()
    if not values or set(counters) != set(_COUNTERS) or not all(type(v) is int and v >= 0 for v in values):
        raise StateError(f"the state's meta.counters {state.get('meta.counters')!r} is corrupt (expected "
                         f"non-negative integers {list(_COUNTERS)}); re-save it with reg.save().")
    return tuple(values)


def _saved_last(state: Mapping[str, Any]) -> Dict[str, float]:
    last = _json(state, "meta.last", "{}")
    if not isinstance(last, dict) or not set(last) <= set(_METRIC_KEYS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in last.values()):
        raise StateError(f"the state's meta.last {state.get('meta.last')!r} is corrupt (expected numbers for some of "
                         f"{list(_METRIC_KEYS)}); re-save it with reg.save().")
    return last


def _tensors(last: Dict[str, float], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: torch.tensor(float(v), dtype=torch.float32, device=device) for k, v in last.items()}


def _input_grid(raw: Any) -> Optional[Tuple[int, int]]:
    """The ``meta.input_grid`` entry: ``None`` or an ``(h, w)`` pair of positive ints."""
    try:
        value = json.loads(raw)
        if value is None:
            return None
        h, w = (int(v) for v in value)
        if h > 0 and w > 0 and list(value) == [h, w]:
            return (h, w)
    except (TypeError, ValueError):
        pass
    raise StateError(f"the state's input grid {raw!r} is corrupt (expected null or [h, w]); re-save it with "
                     "reg.save().")


def _attacker_info(info: Any, config: PrivacyConfig) -> Tuple[int, torch.device]:
    """``in_features`` of the saved attacker and the device to restore it on (the config's, else the saved one)."""
    in_features = info.get("in_features") if isinstance(info, dict) else None
    if type(in_features) is not int or in_features < 1:
        raise StateError(f"the state's meta.attacker {info!r} is corrupt (expected in_features, a positive integer, "
                         "and device); re-save it with reg.save().")
    try:
        if config.device is not None:
            return in_features, torch.device(config.device)
        device = torch.device(str(info.get("device", "cpu")))
    except RuntimeError as exc:
        raise StateError(f"the state's attacker device {info.get('device')!r} is not a device ({exc}); pass "
                         "device= to PrivacyRegularizer.load.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    return in_features, device


def _attacker_weights(state: Mapping[str, Any], attacker: ProxyAttacker,
                      config: PrivacyConfig) -> Dict[str, torch.Tensor]:
    expected = attacker.state_dict()
    got = {k[len("attacker."):]: v for k, v in state.items() if k.startswith("attacker.")}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"attacker.{k} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
             for k, v in got.items() if k in expected and v.shape != expected[k].shape]
    if missing or extra or wrong:
        found = "; ".join([*([f"missing {['attacker.' + k for k in missing]}"] if missing else []),
                           *([f"unexpected {['attacker.' + k for k in extra]}"] if extra else []), *wrong])
        raise StateError(f"the attacker weights in the state do not match the configured architecture (hidden="
                         f"{config.hidden}, in_features={attacker.in_features}): {found}; the file is corrupt or from "
                         "another version.")
    if any(v.dtype != torch.float32 for v in got.values()):
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in got.values()})
        raise StateError(f"the attacker weights in the state are {', '.join(dtypes)}, but states are saved in fp32 "
                         "(whatever the training precision): the file was converted after saving; resume from "
                         "the file as saved.")
    return got


def _saved_generator(rng: Any, device: torch.device) -> torch.Generator:
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1:
        raise StateError("the state's rng.attacker (the attacker's dropout RNG state) is missing or not a 1-d uint8 "
                         "tensor; the file is corrupt: re-save it with reg.save().")
    generator = torch.Generator(device=device)
    try:
        generator.set_state(rng.clone())
    except (RuntimeError, TypeError, ValueError) as exc:
        raise StateError(f"the state's rng.attacker is not a {device.type} RNG state ({exc}); resume on the device "
                         "it was saved on, or re-save it with reg.save().") from exc
    return generator


def _saved_bank(bank: Optional[torch.Tensor], in_features: int, device: torch.device) -> Optional[torch.Tensor]:
    if bank is None:
        return None
    if bank.dtype != torch.float32 or bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] != in_features \
            or not torch.isfinite(bank).all():
        raise StateError(f"the state's bank.nonmember (non-member features) is {bank.dtype} {tuple(bank.shape)}, "
                         f"but this attacker takes finite fp32 features of shape (n, {in_features}); the file is "
                         "corrupt.")
    return bank.clone().to(device)
