"""The diffusers scripts' :class:`PrivacyRegularizer`: a delegate that holds the core regulariser.

It is not a subclass of :class:`smplora_plugin.PrivacyRegularizer` (the core): it holds one in
``reg.core`` and hands it the script's data, as opacus' and Lightning's wrappers hand theirs to the
module they hold. Every per-step call takes this step's row count ``n = reg.privacy_rows(B)``
explicitly, so the calls of a step may come in any order.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import FeatureError, HoldoutError, StateError
from smplora_plugin.regularizer import PrivacyRegularizer as CoreRegularizer

from . import accelerator as wiring
from .adapters import base_prediction
from .args import privacy_config_from_args
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

    Args:
        config: the :class:`PrivacyConfig` (``from_args`` builds it from ``--privacy*`` options).
        holdout: the held-out batches (also settable by :meth:`attach`).
        **kwargs: passed to the core (``plugins=``, ``distributed=``, config overrides).
    """

    def __init__(self, config: Optional[PrivacyConfig] = None, *, holdout: Optional[HoldoutImages] = None,
                 **kwargs: Any):
        self.core = CoreRegularizer(config, **kwargs)
        self.holdout = holdout
        self.accelerator: Any = None                 # set once by attach()
        self.state_filename = wiring.STATE_FILENAME

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: Optional[Union[str, torch.device]] = None,
                  **kwargs: Any) -> Optional["PrivacyRegularizer"]:
        """Build from ``add_privacy_args`` options; ``None`` for ``--privacy none``."""
        cfg = privacy_config_from_args(args, device=device)
        return None if cfg is None else cls(cfg, **kwargs)

    # ---------------------------------------------------------------- the core's state, read through
    @property
    def config(self) -> PrivacyConfig:
        return self.core.config

    @property
    def attacker(self) -> Optional[torch.nn.Module]:
        return self.core.attacker

    @property
    def global_step(self) -> int:
        return self.core.global_step

    @property
    def attacker_updates(self) -> int:
        return self.core.attacker_updates

    def wants_nonmembers(self, update_attacker: bool = True) -> bool:
        return self.core.wants_nonmembers(update_attacker)

    def nonmember_rows(self, batch_size: int) -> int:
        return self.core.nonmember_rows(batch_size)

    def metrics(self) -> Dict[str, float]:
        return self.core.metrics()

    def state_dict(self) -> Dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.core.load_state_dict(state)

    def save(self, path: PathLike) -> None:
        """The core state alone (``smplora audit`` reads it), without the holdout cursor."""
        self.core.save(path)

    def annotate(self, lora_path: PathLike, extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Write the ``smplora.*`` header entries into the saved LoRA file (the core's ``annotate``)."""
        return self.core.annotate(lora_path, extra)

    # ---------------------------------------------------------------- the step
    def privacy_rows(self, batch_size: int, *, with_prior_preservation: bool = False) -> int:
        """This step's row count ``n``: how many leading samples of a training batch of ``batch_size`` feed the
        privacy term (the core's schedule, ``privacy_fraction`` taken over steps; possibly 0). Depends only on
        ``batch_size`` and the step, so it may be called any number of times.

        ``with_prior_preservation=True`` (DreamBooth: instance images first, then as many class images)
        counts the instance half only, so the first rows never reach a class image.
        """
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
        if not self.config.calibrated or _checked_rows(rows) == 0:
            return None
        return base_prediction(model, fn, self.accelerator)

    def features(self, pred: torch.Tensor, target: torch.Tensor, *, rows: Rows,
                 reference: Optional[torch.Tensor] = None,
                 timesteps: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Member features of a training batch: the core's features of its first ``rows`` samples, with the
        graph kept; ``None`` when ``rows`` is 0 (``reg.step(loss, None, ...)`` then scales the loss by the
        last denominator). ``reference`` is the base prediction of those samples (calibrated features)."""
        check_unpacked(pred, self.config.feature_grid)
        if _checked_rows(rows) == 0:
            return None
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
        return self.core.features(pred, target, timesteps=timesteps, reference=reference)

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
        if _checked_rows(rows) == 0 or not self.core.wants_nonmembers(update_attacker=bool(sync)):
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
        the regularised loss itself. Its value is in ``metrics()["regularized_loss"]`` either way."""
        return self.core.step(loss, member_feats, nonmember_feats, update_attacker=update_attacker,
                              keep_loss_value=keep_loss_value)

    # ---------------------------------------------------------------- accelerate
    def attach(self, accelerator: Any, holdout: Optional[HoldoutImages] = None, *,
               state_filename: str = wiring.STATE_FILENAME) -> Tuple[Any, Any]:
        """Register accelerate save / load pre-hooks, remember the holdout batches and print :meth:`summary`.

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
        self.state_filename = state_filename
        handles = wiring.register_hooks(accelerator, self.save_checkpoint, self.load_checkpoint)
        if accelerator.is_main_process:
            print(self.summary(), flush=True)
        return handles

    attach_accelerator = attach   # the name used in the ecosystem notes

    def summary(self) -> str:
        """The start-up summary :meth:`attach` prints (like kohya's box)."""
        return wiring.summary(self.config, self.holdout, self.state_filename)

    def save_checkpoint(self, folder: PathLike) -> Path:
        """Write the regulariser state and holdout cursor to ``folder/smplora_state.safetensors``."""
        return wiring.save_checkpoint(self.core, self.holdout, Path(folder) / self.state_filename)

    def load_checkpoint(self, folder: PathLike) -> None:
        """Restore :meth:`save_checkpoint` output (validated whole before anything changes)."""
        wiring.load_checkpoint(self.core, self.holdout, Path(folder) / self.state_filename)

    # ---------------------------------------------------------------- logging
    def log_dict(self, prefix: str = "smplora/") -> Dict[str, float]:
        """:meth:`metrics` with a prefix, for ``accelerator.log(..., step=global_step)``."""
        return {prefix + k: float(v) for k, v in self.metrics().items()}

    def progress_postfix(self) -> Dict[str, str]:
        """A compact dict for ``progress_bar.set_postfix``: ``mia_ce`` (the attacker's cross-entropy on
        members) and ``mia_acc`` (its balanced accuracy), the names the kohya shim shows too."""
        return self.core.progress_postfix()


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
