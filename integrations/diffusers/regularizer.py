"""The diffusers scripts' :class:`PrivacyRegularizer`: a delegate that holds the core regulariser.

It is not a subclass of :class:`smplora_plugin.PrivacyRegularizer` (the core): it holds one in
``reg.core`` and hands it the script's data, as opacus' and Lightning's wrappers hand theirs to the
module they hold. Every per-step call takes this step's row count ``n = reg.privacy_rows(B)``
explicitly, so the calls of a step may come in any order.

With DP noise (``--privacy dpsgd``, or ``smplora`` / ``mplora`` with ``--privacy_noise_multiplier`` /
``--privacy_target_epsilon``) it also holds the core's :class:`~smplora_plugin.dp.DPTraining` in ``reg.dp``, built
by :meth:`PrivacyRegularizer.attach` from the script's model, optimiser and dataloader; the same block lines then
run DP-SGD (``reg.core`` is ``None`` for DP-SGD alone).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.dp import DPError, DPOptions, DPTraining
from smplora_plugin.errors import FeatureError, HoldoutError, StateError
from smplora_plugin.metadata import annotate as annotate_file
from smplora_plugin.metadata import build_privacy_metadata
from smplora_plugin.regularizer import PrivacyRegularizer as CoreRegularizer

from . import accelerator as wiring
from . import dp as dp_wiring
from .adapters import base_prediction
from .args import dp_options_from_args, privacy_config_from_args
from .holdout import HoldoutImages

PathLike = Union[str, "os.PathLike[str]"]
Rows = Optional[int]   # a row count: how many leading samples of a batch feed the privacy term; None = all

_BASE_LINE = ("n = reg.privacy_rows(len(batch[\"pixel_values\"])); predict(batch, n) with base_pred = "
              "reg.reference(unet, n, lambda: unet(noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n], "
              "return_dict=False)[0])")


def _checked_rows(rows: Any) -> Rows:
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise FeatureError(f"rows={rows!r}: give this step's row count n = reg.privacy_rows(batch_size) "
                           "(an int >= 0), or None for all rows of a held-out batch.")
    return rows


def check_unpacked(pred: Any, grid: Any) -> None:
    """Refuse a packed token prediction ``(B, tokens, D)`` (FLUX) where (B, C, H, W) loss maps are pooled."""
    if grid is not None and isinstance(pred, torch.Tensor) and pred.ndim == 3:
        raise FeatureError(
            f"model_pred has shape {tuple(pred.shape)}: a packed (B, tokens, channels) prediction, as FLUX's "
            "transformer returns. Unpack it to (B, C, H, W) latents first, as train_dreambooth_lora_flux.py does "
            "before its loss (FluxPipeline._unpack_latents(model_pred, height=..., width=..., vae_scale_factor=...)), "
            "and unpack the base prediction of reg.reference the same way (see docs/diffusers.md).")


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
                raise FeatureError(f"prior-preservation batch has odd size {t.shape[0]}: expected instance images "
                                   "followed by as many class images.")
            t = torch.chunk(t, 2, dim=0)[0]
        out.append(t)
    return out[0] if len(out) == 1 else tuple(out)


class PrivacyRegularizer:
    """The core regulariser (``reg.core``) wired to a diffusers script: held-out batches through the
    script's forward, accelerate checkpoint hooks, trackers. A delegate, not a subclass: it adds no
    algorithm, and the per-step calls take the step's row count explicitly::

        n = reg.privacy_rows(len(batch["pixel_values"]))        # this step's rows in the privacy term
        base_pred = reg.reference(unet, n, lambda: unet(x[:n], t[:n], c[:n], return_dict=False)[0])
        loss = reg.step(loss, reg.features(model_pred, target, rows=n, reference=base_pred),
                        reg.nonmember_features(lambda b: predict(b)[:3], rows=n))

    With ``n == 0`` (``--privacy_fraction`` below 1, taken over steps) ``reference``, ``features`` and
    ``nonmember_features`` return ``None`` without a forward. ``rows=None`` means every row (a held-out
    batch, used whole). Anything else of the core is at ``reg.core``.

    Under DP noise ``n`` is every row of the batch (SMP-LoRA + DP noise: each sample has its own term) or 0
    (DP-SGD alone: no privacy term, so no feature, base or held-out forward), and ``reg.step`` collects the
    per-sample gradients of the previous backward before it returns the loss (see ``docs/diffusers.md``).

    Args:
        config: the :class:`PrivacyConfig` (``from_args`` builds it from ``--privacy*`` options); ignored
            with ``dp_only``.
        holdout: the held-out batches (also settable by :meth:`attach`).
        dp_options: the DP noise (:func:`~.args.dp_options_from_args`); ``None``: no DP.
        dp_only: DP-SGD alone (``--privacy dpsgd``): no core regulariser, ``reg.core`` is ``None``.
        script_args: the script's parsed arguments (``--train_batch_size``, ``--max_train_steps``, ...), which
            :meth:`attach` reads for the DP batch and plan; ``from_args`` passes them.
        **kwargs: passed to the core (``plugins=``, ``distributed=``, config overrides).
    """

    def __init__(self, config: Optional[PrivacyConfig] = None, *, holdout: Optional[HoldoutImages] = None,
                 dp_options: Optional[DPOptions] = None, dp_only: bool = False, script_args: Any = None,
                 **kwargs: Any):
        if dp_only and dp_options is None:
            raise DPError("dp_only=True (--privacy dpsgd) needs dp_options: a noise level "
                          "(--privacy_noise_multiplier or --privacy_target_epsilon).")
        if dp_options is not None and not isinstance(dp_options, DPOptions):
            raise DPError(f"dp_options must be DPOptions (dp_options_from_args(args)), got "
                          f"{type(dp_options).__name__}.")
        self.core: Optional[CoreRegularizer] = None if dp_only else CoreRegularizer(config, **kwargs)
        self.holdout = holdout
        self.accelerator: Any = None                 # set once by attach()
        self.state_filename = wiring.STATE_FILENAME
        self.dp_options = dp_options
        self.dp: Optional[DPTraining] = None         # built by attach() under DP noise
        self.dp_state_filename = dp_wiring.DP_STATE_FILENAME
        self.script_args = script_args
        self._sample_losses: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # (member feats, (B,) losses)
        self._dp_cache: Tuple[Any, Dict[str, str], Dict[str, float]] = (None, {}, {})

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None,
                  **kwargs: Any) -> Optional["PrivacyRegularizer"]:
        """Build from ``add_privacy_args`` options; ``None`` for ``--privacy none``. Every option, the DP ones
        included, is checked here, before anything is built."""
        opts = dp_options_from_args(args)
        cfg = privacy_config_from_args(args, device=device)
        if cfg is None and opts is None:
            return None
        return cls(cfg, dp_options=opts, dp_only=cfg is None, script_args=args, **kwargs)

    # ---------------------------------------------------------------- the core's state, read through
    @property
    def config(self) -> Optional[PrivacyConfig]:
        """The core's config; ``None`` for DP-SGD alone."""
        return None if self.core is None else self.core.config

    @property
    def attacker(self) -> Optional[torch.nn.Module]:
        return None if self.core is None else self.core.attacker

    @property
    def global_step(self) -> int:
        """The core's step counter; for DP-SGD alone, the noised optimiser steps."""
        if self.core is None:
            return 0 if self.dp is None else self.dp.dp.steps
        return self.core.global_step

    @property
    def attacker_updates(self) -> int:
        return 0 if self.core is None else self.core.attacker_updates

    def wants_nonmembers(self, update_attacker: bool = True) -> bool:
        return False if self.core is None else self.core.wants_nonmembers(update_attacker)

    def nonmember_rows(self, batch_size: int) -> int:
        return 0 if self.core is None else self.core.nonmember_rows(batch_size)

    def metrics(self) -> Dict[str, float]:
        """The core's metrics (empty for DP-SGD alone); the DP figures are in :meth:`log_dict` and the header."""
        return {} if self.core is None else self.core.metrics()

    def state_dict(self) -> Dict[str, Any]:
        return self._need_core("state_dict").state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._need_core("load_state_dict").load_state_dict(state)

    def _need_core(self, what: str) -> CoreRegularizer:
        if self.core is None:
            raise StateError(f"reg.{what}: DP-SGD alone (--privacy dpsgd) has no regulariser state; the DP state is "
                             "reg.dp.state_dict(), saved by the checkpoint hooks.")
        return self.core

    def save(self, path: PathLike) -> Optional[Path]:
        """The core state alone (``smplora audit`` reads it), without the holdout cursor. DP-SGD alone has no
        regulariser state: nothing is written and ``None`` returned."""
        if self.core is None:
            return None
        self.core.save(path)
        return Path(path)

    def file_metadata(self) -> Dict[str, str]:
        """The ``smplora.*`` header entries: the core's (method, config, metrics) and, under DP noise,
        ``smplora.dp`` (epsilon, delta, sigma, clip, sampling and its assumption, ...)."""
        if self.core is not None:
            entries = self.core.file_metadata()
        else:
            entries = build_privacy_metadata(extra={"smplora.method": "dp-sgd"})
        if self.dp is not None:
            entries.update(self.dp.file_metadata())
        return entries

    def annotate(self, lora_path: PathLike, extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Write :meth:`file_metadata` (plus ``extra``) into the saved LoRA file's header. Under DP noise it also
        prints the epsilon spent, with the sampling it assumes (``DPTraining.summary``)."""
        if self.dp_options is not None and self.dp is None:
            raise DPError(f"DP noise was never attached, so there is no epsilon to record: {dp_wiring.ATTACH_LINE}.")
        entries = self.file_metadata()
        if extra:
            entries.update(extra)
        written = annotate_file(lora_path, entries=entries)
        if self.dp is not None:
            print(f"smplora DP: {self.dp.summary()}", flush=True)
        return written

    # ---------------------------------------------------------------- the step
    def privacy_rows(self, batch_size: int, *, with_prior_preservation: bool = False) -> int:
        """This step's row count ``n``: how many leading samples of a training batch of ``batch_size`` feed the
        privacy term (the core's schedule, ``privacy_fraction`` taken over steps; possibly 0). Depends only on
        ``batch_size`` and the step, so it may be called any number of times.

        ``with_prior_preservation=True`` (DreamBooth: instance images first, then as many class images)
        counts the instance half only, so the first rows never reach a class image.
        """
        if self.dp_options is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise FeatureError(f"batch_size={batch_size!r} must be a positive int (the training batch's size).")
            if with_prior_preservation:
                raise DPError("prior preservation with DP noise is not supported: class images share the batch.")
            return 0 if self.core is None else batch_size    # DP: no privacy term, or every row has its own
        rows = self.core.privacy_rows(batch_size)  # validates batch_size
        if with_prior_preservation:
            if batch_size % 2:
                raise FeatureError(f"prior-preservation batch has odd size {batch_size}: expected instance images "
                                   "followed by as many class images.")
            rows = self.core.privacy_rows(batch_size // 2)
        return rows

    def reference(self, model: Any, rows: Rows, fn: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        """The base prediction for calibrated features, or ``None`` (and no forward) when not calibrated or
        ``rows`` is 0.

        ``fn`` repeats the forward's model call on the first ``rows`` samples of its inputs (all of them for
        ``rows=None``, a held-out batch), e.g. ``reg.reference(unet, n, lambda: unet(noisy_latents[:n],
        timesteps[:n], encoder_hidden_states[:n], return_dict=False)[0])``; it runs once more under
        ``no_grad`` with the LoRA of ``model`` disabled (see :func:`base_prediction`).
        """
        if self.core is None or not self.config.calibrated or _checked_rows(rows) == 0:
            return None
        return base_prediction(model, fn, self.accelerator)

    def features(self, pred: torch.Tensor, target: torch.Tensor, *, rows: Rows,
                 reference: Optional[torch.Tensor] = None,
                 timesteps: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Member features of a training batch: the core's features of its first ``rows`` samples, with the
        graph kept; ``None`` when ``rows`` is 0 (``reg.step(loss, None, ...)`` then scales the loss by the
        last denominator). ``reference`` is the base prediction of those samples (calibrated features).

        Under SMP-LoRA + DP noise ``rows`` is the whole batch, and the per-sample MSE of ``pred`` and ``target``
        is kept with the returned features for :meth:`step` (the per-sample objective's ``l_i``)."""
        if self.core is None:            # DP-SGD alone: no privacy term
            _checked_rows(rows)
            return None
        check_unpacked(pred, self.config.feature_grid)
        if _checked_rows(rows) == 0:
            return None
        if self.dp_options is not None and isinstance(pred, torch.Tensor) and pred.ndim and rows != pred.shape[0]:
            raise FeatureError(f"rows={rows} but the batch has {pred.shape[0]} samples: under DP noise every sample "
                               "has its own term, so pass n = reg.privacy_rows(len(batch[\"pixel_values\"])), the "
                               "whole batch.")
        if rows is not None and isinstance(pred, torch.Tensor) and pred.ndim:
            if rows > pred.shape[0]:
                raise FeatureError(f"rows={rows} but the batch has {pred.shape[0]} samples: pass the row count of "
                                   "this batch, n = reg.privacy_rows(len(batch)).")
            if isinstance(reference, torch.Tensor) and reference.ndim and reference.shape[0] != rows:
                raise FeatureError(
                    f"base_pred has {reference.shape[0]} samples but the privacy term uses the first {rows} of the "
                    f"{pred.shape[0]} in the batch (privacy_fraction={self.config.privacy_fraction:g}): compute it "
                    f"on the privacy rows, {_BASE_LINE} (see docs/diffusers.md).")
            if isinstance(target, torch.Tensor) and target.shape[:1] == pred.shape[:1]:
                pred, target = pred[:rows], target[:rows]
                if isinstance(timesteps, torch.Tensor) and timesteps.ndim:
                    timesteps = timesteps[:rows]
        if self.config.calibrated and reference is None:
            raise FeatureError(
                "calibrated features (--privacy_preset robust / --privacy_calibrated) need the base model's "
                f"prediction at the same noisy input: {_BASE_LINE} next to the training forward, then "
                "reg.features(model_pred, target, rows=n, reference=base_pred) (see docs/diffusers.md).")
        feats = self.core.features(pred, target, timesteps=timesteps, reference=reference)
        if self.dp_options is not None:
            if not isinstance(target, torch.Tensor) or target.shape != pred.shape:
                raise FeatureError("under DP noise the per-sample loss is the MSE of model_pred and target: pass the "
                                   f"target shaped like model_pred {tuple(pred.shape)}.")
            self._sample_losses = (feats, dp_wiring.per_sample_mse(pred, target))
        return feats

    def nonmember_features(self, forward_fn: Callable[[Any], Tuple[torch.Tensor, ...]], batch: Any = None, *,
                           rows: Rows, sync: Optional[bool] = None) -> Optional[torch.Tensor]:
        """Features of the next held-out batch through the script's forward, or ``None`` (and no draw) when
        this step needs none: ``rows`` (the training batch's row count) is 0, or the core does not want fresh
        non-members (``wants_nonmembers``): on gradient-accumulation micro-steps, i.e. when ``sync``
        (default: ``accelerator.sync_gradients``) is false, with ``k_steps == 0``, and between refreshes of
        ``nonmember_every``.

        ``forward_fn(batch)`` runs under ``no_grad`` on the whole held-out batch and returns ``(model_pred,
        target)`` exactly as the training forward does, plus the base prediction of every row
        (``reg.reference(unet, None, ...)``) as a third value with calibrated features.
        """
        if sync is None:
            sync = self.accelerator.sync_gradients if self.accelerator is not None else True
        if _checked_rows(rows) == 0 or self.core is None or not self.core.wants_nonmembers(update_attacker=bool(sync)):
            return None
        if batch is None:
            if self.holdout is None:
                raise HoldoutError("no holdout batches attached: pass HoldoutImages to reg.attach(accelerator, "
                                   "holdout) or give the batch explicitly.")
            batch = next(self.holdout)
        device = self.accelerator.device if self.accelerator is not None else None
        return nonmember_loss_maps(self.core, forward_fn, wiring.to_device(batch, device))

    def step(self, loss: torch.Tensor, member_feats: Optional[torch.Tensor],
             nonmember_feats: Optional[torch.Tensor] = None, *, update_attacker: bool = True,
             keep_loss_value: bool = True) -> torch.Tensor:
        """The core's :meth:`~smplora_plugin.PrivacyRegularizer.step`, returning by default a loss with the
        value of ``loss`` (so the script's ``step_loss`` / ``train_loss`` and its trackers keep showing
        the denoising loss) and the gradient of the regularised loss; ``keep_loss_value=False`` returns
        the regularised loss itself. Its value is in ``metrics()["regularized_loss"]`` either way.

        Under DP noise it first hands the per-sample gradients of the previous backward to ``reg.dp``
        (:meth:`DPTraining.collect`; the optimiser's pre-hook takes the last ones). DP-SGD alone returns ``loss``
        untouched. SMP-LoRA + DP noise trains the core's per-sample objective
        (:meth:`~smplora_plugin.PrivacyRegularizer.step_per_sample`) on the per-sample MSE kept by
        :meth:`features`, whose mean must be ``loss`` (the scripts' ``F.mse_loss(..., reduction="mean")``)."""
        if self.dp_options is None:
            return self.core.step(loss, member_feats, nonmember_feats, update_attacker=update_attacker,
                                  keep_loss_value=keep_loss_value)
        if self.dp is None:
            raise DPError(f"DP noise is not attached to the script's optimiser yet: {dp_wiring.ATTACH_LINE}.")
        if self.core is None:
            self.dp.collect()
            return loss
        pending, self._sample_losses = self._sample_losses, None
        if member_feats is None or pending is None or pending[0] is not member_feats:
            raise FeatureError("under SMP-LoRA + DP noise reg.step needs this step's reg.features(model_pred, target, "
                               "rows=n) (n = reg.privacy_rows(batch size), the whole batch): it carries each sample's "
                               "loss.")
        losses = pending[1]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not torch.allclose(
                loss.detach().float().reshape(()), losses.detach().mean().to(loss.device), rtol=1e-4, atol=1e-6):
            raise FeatureError(
                f"under SMP-LoRA + DP noise the loss must be the plain mean MSE of model_pred and target (the "
                f"scripts' F.mse_loss(model_pred.float(), target.float(), reduction=\"mean\")), so that each "
                f"sample's term has its own MSE; got {float(loss.detach().float().mean()):.6g} against "
                f"{float(losses.detach().mean()):.6g}. Drop loss weighting (--snr_gamma, --weighting_scheme), or use "
                "--privacy dpsgd.")
        self.dp.collect()
        out = self.core.step_per_sample(losses, member_feats, nonmember_feats, update_attacker=update_attacker,
                                        keep_loss_value=False)
        return CoreRegularizer.keep_loss_value(out, loss) if keep_loss_value else out

    # ---------------------------------------------------------------- accelerate
    def attach(self, accelerator: Any, holdout: Optional[HoldoutImages] = None, *, model: Any = None,
               optimizer: Any = None, train_dataloader: Any = None,
               state_filename: str = wiring.STATE_FILENAME) -> Tuple[Any, Any]:
        """Register accelerate save / load pre-hooks, remember the holdout batches and print :meth:`summary`.

        ``accelerator.save_state(dir)`` then also writes ``dir/smplora_state.safetensors`` (attacker,
        its optimiser and RNG, counters, the holdout cursor) and ``accelerator.load_state(dir)``
        restores it. The attacker is never passed through ``accelerator.prepare`` and never
        registered with ``register_for_checkpointing`` (which pickles). Returns the two hook handles.

        Under DP noise it also builds ``reg.dp`` (:class:`~smplora_plugin.dp.DPTraining`) on the LoRA of
        ``model`` (the prepared peft UNet / transformer), with ``N = len(train_dataloader.dataset)``, ``B =``
        ``--train_batch_size`` x accumulation x processes and the planned ``--max_train_steps``, and hooks it to
        ``optimizer``; the checkpoints then also hold ``smplora_dp_state.safetensors`` (accountant history, noise
        generator). Without DP noise these three are not needed. Everything is checked before anything changes,
        including the DP state of the checkpoint ``--resume_from_checkpoint`` names (other DP settings are refused
        here, before the script writes its trackers' config).
        """
        if self.accelerator is not None:
            raise StateError("this regulariser is already attached to an accelerator; attach it once.")
        if self.dp_options is not None:
            dpt = dp_wiring.build(self.dp_options, accelerator, self.script_args or {}, model=model,
                                  optimizer=optimizer, train_dataloader=train_dataloader, regularizer=self.core)
            try:
                dp_wiring.check_resume(dpt, self.script_args or {}, self.dp_state_filename)
            except Exception:
                dpt.detach()
                raise
            self.dp = dpt
        self.accelerator = accelerator
        if holdout is not None:
            self.holdout = holdout
        self.state_filename = state_filename
        handles = wiring.register_hooks(accelerator, self.save_checkpoint, self.load_checkpoint)
        if accelerator.is_main_process:
            print(self.summary(), flush=True)
        return handles

    attach_accelerator = attach   # the name used in the ecosystem notes

    def summary(self) -> str:
        """The start-up summary :meth:`attach` prints (like kohya's box)."""
        files = [self.state_filename] if self.core is not None else []
        files += [self.dp_state_filename] if self.dp is not None else []
        dp_lines = (dp_wiring.box_lines(self.dp, self.core is not None, ", ".join(f"<checkpoint>/{f}" for f in files))
                    if self.dp is not None else None)
        return wiring.summary(self.config, self.holdout, self.state_filename, dp_lines=dp_lines)

    def save_checkpoint(self, folder: PathLike) -> Optional[Path]:
        """Write the regulariser state and holdout cursor to ``folder/smplora_state.safetensors`` and, under DP
        noise, the DP state to ``folder/smplora_dp_state.safetensors``; returns the first file written."""
        written = []
        if self.core is not None:
            written.append(wiring.save_checkpoint(self.core, self.holdout, Path(folder) / self.state_filename))
        if self.dp is not None:
            written.append(dp_wiring.save_state(self.dp, Path(folder) / self.dp_state_filename))
        return written[0] if written else None

    def load_checkpoint(self, folder: PathLike) -> None:
        """Restore :meth:`save_checkpoint` output (validated whole before anything changes). A checkpoint saved
        with other DP settings (sigma, clip, batch, data set size, delta, accountant), or with DP noise where this
        run has none (or the reverse), is refused with a :class:`~smplora_plugin.dp.DPError`."""
        dp_path = dp_wiring.check_files(Path(folder), self.dp is not None, self.dp_state_filename)
        if dp_path is None:
            wiring.load_checkpoint(self.core, self.holdout, Path(folder) / self.state_filename)
            return
        saved = dp_wiring.read_state(dp_path)
        before = self.dp.state_dict()
        self.dp.load_state_dict(saved)            # refuses other DP settings before it changes anything
        if self.core is None:
            return
        try:
            wiring.load_checkpoint(self.core, self.holdout, Path(folder) / self.state_filename)
        except Exception:
            self.dp.load_state_dict(before)       # the regulariser refused: leave the DP state as it was
            raise

    # ---------------------------------------------------------------- logging
    def log_dict(self, prefix: str = "smplora/") -> Dict[str, float]:
        """:meth:`metrics` with a prefix, for ``accelerator.log(..., step=global_step)``; under DP noise also
        ``epsilon``, ``dp_steps`` and ``dp_grad_norm_median`` (:meth:`DPTraining.metrics`)."""
        out = {prefix + k: float(v) for k, v in self.metrics().items()}
        if self.dp is not None:
            out.update({prefix + k.split("/", 1)[-1]: float(v) for k, v in self._dp_report()[1].items()})
        return out

    def _dp_report(self) -> Tuple[Dict[str, str], Dict[str, float]]:
        """``(dp.postfix(), dp.metrics())`` from one accountant call per optimiser step: the epsilon (Opacus's RDP
        conversion) costs more than a tiny model's step, and the block asks for the postfix on every micro-batch.
        The postfix is ``dp.postfix()``'s ``eps``, formatted from the same epsilon."""
        steps = self.dp.dp.steps
        if self._dp_cache[0] != steps:
            metrics = self.dp.metrics()
            self._dp_cache = (steps, {"eps": f"{metrics['smplora/epsilon']:.3g}"}, metrics)
        metrics = dict(self._dp_cache[2])
        norms = self.dp.last_norms           # the only figure that changes between two optimiser steps
        if norms is not None and norms.numel():
            metrics["smplora/dp_grad_norm_median"] = float(norms.median())
        return self._dp_cache[1], metrics

    def progress_postfix(self) -> Dict[str, str]:
        """A compact dict for ``progress_bar.set_postfix``: ``mia_ce`` (the attacker's cross-entropy on
        members) and ``mia_acc`` (its balanced accuracy), the names the kohya shim shows too; under DP
        noise ``eps``, the epsilon so far (its sampling assumption is in the start-up box)."""
        out = {} if self.core is None else dict(self.core.progress_postfix())
        if self.dp is not None:
            out.update(self._dp_report()[0])
        return out


def nonmember_loss_maps(reg: Union[CoreRegularizer, PrivacyRegularizer],
                        forward_fn: Callable[[Any], Tuple[torch.Tensor, ...]], batch: Any) -> torch.Tensor:
    """Run the script's own forward without grad; return the core's features of the whole held-out batch.

    ``forward_fn(batch)`` returns ``(model_pred, target)`` or, with calibrated features,
    ``(model_pred, target, base_pred)`` where ``base_pred = reg.reference(unet, None, ...)``.
    """
    core = reg.core if isinstance(reg, PrivacyRegularizer) else reg
    with torch.no_grad():
        out = forward_fn(batch)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise FeatureError("the non-member forward_fn must return (model_pred, target) or (model_pred, target, "
                               f"base_pred), got {type(out).__name__}"
                               + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
        pred, target = out[0], out[1]
        reference = out[2] if len(out) == 3 else None
        check_unpacked(pred, core.config.feature_grid)
        if core.config.calibrated and reference is None:
            raise FeatureError(
                "calibrated features (--privacy_preset robust / --privacy_calibrated) need the base prediction of "
                "the held-out batch too: make the forward passed to reg.nonmember_features return (model_pred, "
                "target, base_pred) with base_pred = reg.reference(unet, None, lambda: unet(<same inputs>)[0]) "
                "(see docs/diffusers.md).")
        if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape != pred.shape):
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise FeatureError(f"the third value of the non-member forward must be the base prediction, shaped like "
                               f"model_pred {tuple(pred.shape)}; got {got}.")
        return core.features(pred, target, reference=reference).detach()


def privacy_regularizer_from_args(args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None,
                                  **kwargs: Any) -> Optional[PrivacyRegularizer]:
    """A :class:`PrivacyRegularizer` from ``--privacy*`` options, or ``None`` for ``--privacy none``."""
    return PrivacyRegularizer.from_args(args, device=device, **kwargs)
