"""SMP-LoRA inside ComfyUI's own LoRA training (``comfy_extras.nodes_train``).

ComfyUI's ``TrainLoraNode.execute`` builds the adapters, optimiser, loss and guider and runs its
``TrainSampler``; this module runs that very code with two subclasses swapped in for the duration
of one call (:func:`private_training`):

- a guider that also converts the held-out conditioning (an extra cond key, processed by
  ComfyUI exactly like the training conditioning and ignored by its predictor);
- a sampler whose loss function is wrapped: ComfyUI's ``fwd_bwd`` computes the prediction of
  ``x0`` and calls ``loss_fn(x0_pred, x0)``; the wrapper turns that into the SMP-LoRA loss, with
  member features from this very forward and non-member features from a no-grad forward on the
  held-out latents (base-calibrated with the LoRA switched off when the config asks for it).

Nothing of ComfyUI's training code is copied; :mod:`.layout` names what is used and checks it first.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from smplora_plugin import PrivacyRegularizer

from .layout import ComfyTrainingError, train_layout

HOLDOUT_KEY = "smplora_holdout"
_SWAP_LOCK = threading.Lock()


@dataclass
class Holdout:
    """Held-out (non-member) latents ``(H, C, h, w)`` as ComfyUI's LATENT holds them, and H conds."""

    latents: torch.Tensor
    conds: List[Any]


def _trainable(fn: Any) -> bool:
    return isinstance(fn, torch.nn.Module) and any(p.requires_grad for p in fn.parameters())


def _bypass_hook(module: torch.nn.Module) -> Any:
    """The object whose bound method replaced ``module.forward`` in bypass mode, if it holds a trainable adapter.

    ComfyUI's bypass mode (a97c9806 and later) applies a training adapter as ``g(f(x) + h(x))``: it sets
    the layer's ``forward`` to a method of a hook object that keeps ``original_forward`` and ``adapter``.
    """
    fwd = module.__dict__.get("forward")
    hook = getattr(fwd, "__self__", None)
    if hook is None or not hasattr(hook, "original_forward") or not _trainable(getattr(hook, "adapter", None)):
        return None
    return hook if callable(hook.original_forward) else None


@contextlib.contextmanager
def lora_off(model: torch.nn.Module) -> Iterator[None]:
    """Switch the trainable weight adapters of ``model`` off, in weight and in bypass mode.

    Weight mode: adapters sit in ComfyUI's ``weight_function`` / ``bias_function`` lists and are
    removed from them. Bypass mode: the layers whose ``forward`` a trainable adapter's hook replaced
    get their original forward back. Only adapters with trainable parameters are switched off, so
    LoRAs merged or applied before training stay part of the base. Everything is restored
    afterwards, also on error.
    """
    saved, bypassed = [], []
    for module in model.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(module, attr, None)
            if isinstance(fns, list) and fns:
                keep = [f for f in fns if not _trainable(f)]
                if len(keep) != len(fns):
                    saved.append((module, attr, fns))
                    setattr(module, attr, keep)
        hook = _bypass_hook(module)
        if hook is not None:
            bypassed.append((module, module.__dict__["forward"]))
            module.forward = hook.original_forward
    if not saved and not bypassed:
        raise ComfyTrainingError("no trainable LoRA adapter is attached to the model, so the base prediction "
                                 "(calibrated features) cannot be computed.")
    try:
        yield
    finally:
        for module, attr, fns in saved:
            setattr(module, attr, fns)
        for module, fwd in bypassed:
            module.forward = fwd


class PrivateLoss:
    """``loss_fn(x0_pred, x0)`` for ComfyUI's sampler: the adaptation loss, regularised by SMP-LoRA."""

    def __init__(self, criterion: Any, reg: PrivacyRegularizer, holdout: Holdout, sampler: Any, seed: int):
        self.criterion = criterion
        self.reg = reg
        self.holdout = holdout
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        self.last_adaptation_loss: Optional[float] = None
        self._held_in: Optional[torch.Tensor] = None  # held-out latents after process_latent_in

    def __call__(self, x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(x0_pred, x0)
        batch = self.sampler.smplora_batch
        wrap = batch["model_wrap"]
        n = self.reg.privacy_rows(x0_pred.shape[0])   # privacy_fraction over steps: 0 on some steps
        update = self.sampler.smplora_micro % max(1, int(self.sampler.grad_acc)) == 0
        self.last_adaptation_loss = float(loss.detach())
        if n == 0:   # no privacy row on this step: no base or held-out forward, the last denominator
            with torch.autocast(x0_pred.device.type, enabled=False):
                return self.reg.step(loss.float(), None, update_attacker=update)
        calibrated = self.reg.config.calibrated
        reference = None
        if calibrated:  # the base prediction at the same noisy input, LoRA off, same conds
            xt = wrap.inner_model.model_sampling.noise_scaling(
                batch["sigmas"][:n].detach(), batch["noise"][:n], batch["latent"][:n], False)
            with torch.no_grad(), lora_off(wrap.inner_model):
                reference = wrap(xt.detach(), batch["sigmas"][:n].detach(), **self._extra(batch, n))
        nonmember = None
        if self.reg.wants_nonmembers(update):
            nonmember = self._nonmember_features(wrap, batch, self.reg.nonmember_rows(x0_pred.shape[0]))
        with torch.autocast(x0_pred.device.type, enabled=False):
            member = self.reg.features(x0_pred[:n].float(), x0[:n].float(),
                                       reference=None if reference is None else reference.float())
            return self.reg.step(loss.float(), member, nonmember, update_attacker=update)

    def postfix(self) -> Dict[str, str]:
        """Progress-bar entries: the regularised and adaptation losses, the attacker's CE and accuracy."""
        out = {}
        if self.last_adaptation_loss is not None:
            out["adapt_loss"] = f"{self.last_adaptation_loss:.4f}"
        out.update(self.reg.progress_postfix())
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _extra(self, batch: Dict[str, Any], n: int) -> Dict[str, Any]:
        return self.sampler.smplora_make_extra(batch["extra_args"], list(range(n)), full_size=batch["dataset_size"])

    @torch.no_grad()
    def _nonmember_features(self, wrap: Any, batch: Dict[str, Any], n: int) -> torch.Tensor:
        latent = batch["latent"]
        if self._held_in is None:
            self._held_in = wrap.inner_model.process_latent_in(self.holdout.latents.float())
        h = self._held_in.shape[0]
        idx = torch.randperm(h, generator=self.generator)[:n].tolist()
        lat = self._held_in[idx].to(device=latent.device, dtype=latent.dtype)
        noise = torch.randn(lat.shape, generator=self.generator).to(device=latent.device, dtype=latent.dtype)
        sampling = wrap.inner_model.model_sampling
        u = torch.rand(len(idx), generator=self.generator).tolist()
        sigmas = torch.tensor([float(sampling.percent_to_sigma(p)) for p in u], device=latent.device)
        xt = sampling.noise_scaling(sigmas, noise, lat, False)
        x0 = sampling.noise_scaling(torch.zeros_like(sigmas), torch.zeros_like(noise), lat, False)
        member_conds = wrap.conds["positive"]
        held = wrap.conds[HOLDOUT_KEY]
        wrap.conds["positive"] = [held[i] for i in idx]
        try:
            extra = self._extra(batch, len(idx))
            pred = wrap(xt, sigmas, **extra)
            reference = None
            if self.reg.config.calibrated:
                with lora_off(wrap.inner_model):
                    reference = wrap(xt, sigmas, **extra)
        finally:
            wrap.conds["positive"] = member_conds
        with torch.autocast(pred.device.type, enabled=False):
            reference = None if reference is None else reference.float()
            return self.reg.features(pred.float(), x0.float(), reference=reference)


def private_classes(nodes_train: Any, reg: PrivacyRegularizer, holdout: Holdout, seed: int,
                    on_progress: Optional[Callable[[str], None]] = None):
    """Subclasses of ComfyUI's ``TrainSampler`` and ``TrainGuider`` that add the privacy term.

    ``on_progress`` receives a one-line summary of the defense's metrics after every step (the
    node sends it to the UI as the node's progress text).
    """
    train_layout(nodes_train)
    base_sampler, base_guider = nodes_train.TrainSampler, nodes_train.TrainGuider

    class SmploraTrainGuider(base_guider):
        def set_conds(self, positive):
            super().set_conds(positive)
            self.inner_set_conds({HOLDOUT_KEY: holdout.conds})

    class SmploraTrainSampler(base_sampler):
        smplora_make_extra = staticmethod(nodes_train.make_batch_extra_option_dict)

        def __init__(self, loss_fn, optimizer, *args, **kwargs):
            super().__init__(loss_fn, optimizer, *args, **kwargs)
            self.loss_fn = PrivateLoss(loss_fn, reg, holdout, self, seed)
            self.smplora_micro = 0
            self.smplora_batch: Dict[str, Any] = {}
            self.smplora_last_loss = float("nan")

        def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                    dataset_size, bwd=True):
            self.smplora_micro += 1
            self.smplora_batch = {"model_wrap": model_wrap, "sigmas": batch_sigmas, "noise": batch_noise,
                                  "latent": batch_latent, "extra_args": extra_args, "dataset_size": dataset_size}
            loss = super().fwd_bwd(model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                                   dataset_size, bwd=bwd)
            self.smplora_last_loss = float(loss.detach())
            return loss

        def _train_step_standard_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, dataset_size, pbar):
            super()._train_step_standard_mode(model_wrap, cond, extra_args, noisegen, latent_image, dataset_size, pbar)
            self.smplora_show(pbar)

        def smplora_show(self, pbar):
            postfix = {"loss": f"{self.smplora_last_loss:.4f}", **self.loss_fn.postfix()}
            pbar.set_postfix(postfix)
            if on_progress is not None:
                on_progress(f"step {self.smplora_micro}/{self.total_steps}: "
                            + ", ".join(f"{k}={v}" for k, v in postfix.items()))

    if hasattr(base_sampler, "_train_step_bucket_mode"):  # resolution buckets (ResolutionBucket latents)
        def _train_step_bucket_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, pbar):
            base_sampler._train_step_bucket_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, pbar)
            self.smplora_show(pbar)

        SmploraTrainSampler._train_step_bucket_mode = _train_step_bucket_mode

    return SmploraTrainSampler, SmploraTrainGuider


@contextlib.contextmanager
def private_training(nodes_train: Any, reg: PrivacyRegularizer, holdout: Holdout, seed: int,
                     on_progress: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Within the block, ``nodes_train.TrainLoraNode.execute`` trains with the privacy term."""
    sampler_cls, guider_cls = private_classes(nodes_train, reg, holdout, seed, on_progress)
    with _SWAP_LOCK:
        old = nodes_train.TrainSampler, nodes_train.TrainGuider
        nodes_train.TrainSampler, nodes_train.TrainGuider = sampler_cls, guider_cls
        try:
            yield
        finally:
            nodes_train.TrainSampler, nodes_train.TrainGuider = old
