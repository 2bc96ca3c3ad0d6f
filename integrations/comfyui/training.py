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

With DP noise (:class:`DPRun`: DP-SGD alone, or SMP-LoRA + DP noise) ComfyUI trains on batches of one and
accumulates gradients over ``grad_accumulation_steps`` micro-steps. ComfyUI applies the LoRA in weight space (or,
in bypass mode, through the adapter's functional ``h``), so no module hook sees a per-sample gradient; instead
every backward is one sample's, and the core's ``DPTraining(capture="grads")`` reads it from ``p.grad`` of the
tensors ComfyUI's optimiser trains at the start of the next ``fwd_bwd`` (the optimiser step pre-hook reads the
last one), clips it and adds it; the pre-hook discards ComfyUI's accumulated gradient and writes the noised one.

Nothing of ComfyUI's training code is copied; :mod:`.layout` names what is used and checks it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.dp import DPError, DPOptions, DPTraining, check_mixed_precision, dp_options
from smplora_plugin.dp.training import DP_ONLY, innermost_optimizer
from smplora_plugin.metadata import build_privacy_metadata

from .layout import ComfyTrainingError, train_layout

HOLDOUT_KEY = "smplora_holdout"
logger = logging.getLogger("smplora.comfyui")
_SWAP_LOCK = threading.Lock()


@dataclass
class Holdout:
    """Held-out (non-member) latents ``(H, C, h, w)`` as ComfyUI's LATENT holds them, and H conds."""

    latents: torch.Tensor
    conds: List[Any]


#: how ComfyUI's sampler draws the images of a DP step (a batch of one per micro-step), next to the accountant's note
COMFY_SAMPLING = ("ComfyUI draws each micro-step's image uniformly at random from the N training images (a "
                  "torch.randperm draw; in bucket mode a bucket by size, then one of its images), independently of "
                  "the other micro-steps, so a step's B images are B draws with replacement: an image can appear "
                  "more than once in a step (each occurrence clipped to C), which the Poisson accountant's "
                  "assumption does not cover either")


@dataclass
class DPRun:
    """DP noise for one run of ComfyUI's trainer: the checked options and the step geometry.

    ``batch_size`` is ``B``, the images of one optimiser step (ComfyUI's ``grad_accumulation_steps`` micro-steps
    of one image); ``planned_steps`` ComfyUI's ``steps`` (optimiser steps); ``regularizer`` ``None`` for DP-SGD
    alone. :attr:`training` is the ``DPTraining`` the sampler builds once ComfyUI has made its optimiser.
    """

    options: DPOptions
    dataset_size: int
    batch_size: int
    planned_steps: int
    regularizer: Optional[PrivacyRegularizer] = None
    training: Optional[DPTraining] = None

    def check(self) -> None:
        """Every check ``DPTraining`` makes on the settings (sigma for a target epsilon, batch and data set sizes,
        the accountant's import), before ComfyUI builds anything: on a one-element placeholder for the LoRA,
        whose tensors ComfyUI creates inside its node."""
        placeholder = _TrainedTensors([torch.nn.Parameter(torch.zeros(1))])
        self._build(placeholder)

    def attach(self, optimizer: Any) -> DPTraining:
        """``DPTraining`` on the tensors ``optimizer`` (ComfyUI's) trains, attached to it (its step pre-hook)."""
        inner = innermost_optimizer(optimizer)
        params = [p for group in inner.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise DPError("ComfyUI's optimiser trains no tensor with requires_grad: there is no LoRA to privatise.")
        plain = [tuple(p.shape) for p in params if not isinstance(p, torch.nn.Parameter)]
        if plain:
            raise DPError(f"ComfyUI's optimiser trains {len(plain)} tensor(s) that are not nn.Parameters (e.g. shape "
                          f"{plain[0]}); DP noise reads each one's gradient and needs the LoRA's parameters.")
        dpt = self._build(_TrainedTensors(params))
        dpt.attach(optimizer)
        self.training = dpt
        return dpt

    def _build(self, module: torch.nn.Module) -> DPTraining:
        # batch_size 1: ComfyUI divides each micro-step's loss by grad_accumulation_steps, which is B
        return DPTraining(module, self.options, dataset_size=self.dataset_size, batch_size=self.batch_size,
                          planned_steps=self.planned_steps, backward_scale=1.0 / self.batch_size, capture="grads",
                          regularizer=self.regularizer)

    def detach(self) -> None:
        if self.training is not None:
            self.training.detach()


#: the node's DP inputs (0 = off / the default) and what they mean for dp_options
DP_INPUTS = {"privacy_noise_multiplier": "noise_multiplier", "privacy_max_grad_norm": "max_grad_norm",
             "privacy_target_epsilon": "target_epsilon", "privacy_dp_delta": "delta"}


def _zero_off(name: str, value: Any) -> Optional[float]:
    """A DP input's value: ``None`` for 0 (off / the default), else the number (checked by dp_options)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DPError(f"{name}={value!r} must be a number (0 = off, or the default).")
    return None if value == 0 else float(value)


def dp_seed(seed: int) -> int:
    """The DP noise generator's seed, derived from the node's ``seed``: repeatable, but a stream of its own (ComfyUI
    seeds torch's global generator, which draws the batches and sigmas, with ``seed`` itself)."""
    digest = hashlib.sha256(f"smplora-comfyui-dp-noise:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def dp_run(objective: str, values: Dict[str, Any], *, seed: int, batch_size: int, accumulation: int, steps: int,
           members: int, training_dtype: str, lora_dtype: str, model_dtype: Any, existing_lora: Any,
           regularizer: Optional[PrivacyRegularizer]) -> Optional[DPRun]:
    """The node's DP settings, checked before ComfyUI trains anything; ``None`` when the run has no DP noise.

    ``values`` are the node's :data:`DP_INPUTS` (0 = off, or the default); ``objective`` is ``privacy_objective``
    (``dpsgd``: DP-SGD alone; ``smp`` / ``mp`` with a noise level: SMP-LoRA + DP noise). Refused (DPError, naming
    the fix): the core's checks (:func:`~smplora_plugin.dp.dp_options` and ``DPTraining``'s), batch_size > 1,
    fewer training images than a step's batch, an existing LoRA, and the fp16 GradScaler ComfyUI would use.
    """
    given = {DP_INPUTS[k]: _zero_off(k, v) for k, v in values.items()}
    if objective in DP_ONLY and given.get("noise_multiplier") is None and given.get("target_epsilon") is None:
        raise DPError("privacy_objective dpsgd needs a noise level: set privacy_noise_multiplier > 0 (sigma, e.g. 1.0) "
                      "or privacy_target_epsilon > 0 (e.g. 8).")
    options = dp_options(objective, **given, seed=dp_seed(seed), flag="privacy_")
    if options is None:
        return None
    if batch_size != 1:
        raise DPError(f"DP noise in ComfyUI trains on batches of one (batch_size {batch_size} given): ComfyUI applies "
                      "the LoRA in weight space, so each image's gradient is read from a backward of its own. Set "
                      f"batch_size 1 and grad_accumulation_steps to the batch you want per optimiser step (e.g. "
                      f"{batch_size * accumulation} for batch_size {batch_size} x grad_accumulation_steps "
                      f"{accumulation}).")
    if accumulation > members:
        raise DPError(f"grad_accumulation_steps {accumulation} is the DP batch (images per optimiser step), but there "
                      f"are {members} training images: lower grad_accumulation_steps to at most {members}.")
    if existing_lora not in (None, "[None]"):
        raise DPError(f"DP noise with existing_lora {existing_lora!r}: that LoRA was trained outside this run's "
                      "accounting, so the epsilon would not cover it. Train a new LoRA (existing_lora [None]).")
    if training_dtype == "none" and model_dtype == torch.float16 and lora_dtype != "bf16":
        raise DPError("DP noise with training_dtype 'none' on an fp16 model and lora_dtype fp32: ComfyUI then scales "
                      "the loss with a GradScaler, so per-sample gradients would be clipped at the scaled norm. Set "
                      "training_dtype bf16 (or fp32), or lora_dtype bf16.")
    run = DPRun(options, dataset_size=members, batch_size=accumulation, planned_steps=steps, regularizer=regularizer)
    run.check()
    return run


def dp_report(run: DPRun, base_metadata: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """What a finished DP run adds to the node's ``privacy`` output: ``file_metadata`` (``base_metadata``, the
    regulariser's entries, or for DP-SGD alone ``smplora.method = dp-sgd``; plus ``smplora.dp``), ``dp`` (the
    summary with its sampling, the metrics, the settings' lines) and ``text`` (the summary and ComfyUI's sampling,
    for the node's progress text; also logged)."""
    dpt = run.training
    if dpt is None:
        raise ComfyTrainingError("ComfyUI's trainer never built its optimiser, so DP noise was never attached and "
                                 "there is no epsilon to report.")
    if base_metadata is None:
        base_metadata = build_privacy_metadata(extra={"smplora.method": "dp-sgd"})
    text = f"{dpt.summary()} {COMFY_SAMPLING}."
    logger.info("Train LoRA (SMP-LoRA): %s", text)
    return {"file_metadata": {**base_metadata, **dpt.file_metadata()},
            "dp": {"summary": dpt.summary(), "sampling": COMFY_SAMPLING, "metrics": dpt.metrics(),
                   "lines": dpt.lines()},
            "text": text}


class _TrainedTensors(torch.nn.Module):
    """The tensors ComfyUI's optimiser trains (the LoRA's ``lora_up`` / ``lora_down`` / ``alpha`` / ``diff`` /
    ``diff_b`` of every layer, as ComfyUI keeps them in a dict), held by one module for ``DPTraining``. The
    parameters are the optimiser's own objects (``nn.ParameterList`` keeps an ``nn.Parameter`` as it is)."""

    def __init__(self, params: List[torch.nn.Parameter]):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)


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

    def __init__(self, criterion: Any, reg: PrivacyRegularizer, holdout: Holdout, sampler: Any, seed: int,
                 per_sample: bool = False):
        self.criterion = criterion
        self.reg = reg
        self.holdout = holdout
        self.sampler = sampler
        # under DP noise: batches of one, each sample's own term (reg.step_per_sample), every row a privacy row
        self.per_sample = per_sample
        self.generator = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        self.last_adaptation_loss: Optional[float] = None
        self._held_in: Optional[torch.Tensor] = None  # held-out latents after process_latent_in

    def __call__(self, x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(x0_pred, x0)
        batch = self.sampler.smplora_batch
        wrap = batch["model_wrap"]
        update = self.sampler.smplora_micro % max(1, int(self.sampler.grad_acc)) == 0
        self.last_adaptation_loss = float(loss.detach())
        if self.per_sample:
            if x0_pred.shape[0] != 1:
                raise ComfyTrainingError(f"SMP-LoRA + DP noise got a batch of {x0_pred.shape[0]} from ComfyUI's "
                                         "sampler; it trains on batches of one (batch_size 1).")
            n = 1      # privacy_fraction does not apply under DP noise: the sample has its own term
        else:
            n = self.reg.privacy_rows(x0_pred.shape[0])   # privacy_fraction over steps: 0 on some steps
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
            if self.per_sample:   # ComfyUI's mean loss of a batch of one is that sample's loss
                return self.reg.step_per_sample(loss.float().reshape(1), member, nonmember, update_attacker=update)
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


def private_classes(nodes_train: Any, reg: Optional[PrivacyRegularizer], holdout: Optional[Holdout], seed: int,
                    on_progress: Optional[Callable[[str], None]] = None, dp: Optional[DPRun] = None):
    """Subclasses of ComfyUI's ``TrainSampler`` and ``TrainGuider`` that add the privacy term and/or DP noise.

    ``reg``/``holdout``: the SMP-LoRA term (``None`` for DP-SGD alone, which trains ComfyUI's loss as it is).
    ``dp``: DP noise (``None`` without): the sampler builds its ``DPTraining`` on ComfyUI's optimiser, refuses a
    GradScaler (fp16) and batches of more than one, and collects each micro-step's gradient before the next.
    ``on_progress`` receives a one-line summary of the metrics after every step (the node sends it to the UI as
    the node's progress text).
    """
    train_layout(nodes_train)
    if reg is None and dp is None:
        raise ComfyTrainingError("nothing to add to ComfyUI's training: give the SMP-LoRA regulariser, DP noise, "
                                 "or both.")
    base_sampler, base_guider = nodes_train.TrainSampler, nodes_train.TrainGuider

    class SmploraTrainGuider(base_guider):
        def set_conds(self, positive):
            super().set_conds(positive)
            if holdout is not None:
                self.inner_set_conds({HOLDOUT_KEY: holdout.conds})

    class SmploraTrainSampler(base_sampler):
        smplora_make_extra = staticmethod(nodes_train.make_batch_extra_option_dict)

        def __init__(self, loss_fn, optimizer, *args, **kwargs):
            super().__init__(loss_fn, optimizer, *args, **kwargs)
            self.smplora_dp: Optional[DPTraining] = None
            if dp is not None:
                if getattr(self, "grad_scaler", None) is not None:
                    check_mixed_precision("fp16")   # ComfyUI scales the fp16 loss: refused, naming bf16
                if int(self.batch_size) != 1:
                    raise DPError(f"DP noise in ComfyUI needs batch_size 1 (got {self.batch_size}): each backward "
                                  "must be one image's.")
                self.smplora_dp = dp.attach(optimizer)
            if reg is not None:
                self.loss_fn = PrivateLoss(loss_fn, reg, holdout, self, seed, per_sample=dp is not None)
            self.smplora_micro = 0
            self.smplora_batch: Dict[str, Any] = {}
            self.smplora_last_loss = float("nan")

        def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                    dataset_size, bwd=True):
            if self.smplora_dp is not None:
                self.smplora_dp.collect()   # the previous micro-step's backward is over: its gradient is one image's
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
            postfix = {"loss": f"{self.smplora_last_loss:.4f}"}
            if isinstance(self.loss_fn, PrivateLoss):
                postfix.update(self.loss_fn.postfix())
            if self.smplora_dp is not None:   # the epsilon of the optimiser steps so far (sampling: the summary)
                postfix.update(self.smplora_dp.postfix())
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
def private_training(nodes_train: Any, reg: Optional[PrivacyRegularizer], holdout: Optional[Holdout], seed: int,
                     on_progress: Optional[Callable[[str], None]] = None,
                     dp: Optional[DPRun] = None) -> Iterator[None]:
    """Within the block, ``nodes_train.TrainLoraNode.execute`` trains with the privacy term and/or DP noise
    (:func:`private_classes`); the DP optimiser hook is removed afterwards, also on error."""
    sampler_cls, guider_cls = private_classes(nodes_train, reg, holdout, seed, on_progress, dp)
    with _SWAP_LOCK:
        old = nodes_train.TrainSampler, nodes_train.TrainGuider
        nodes_train.TrainSampler, nodes_train.TrainGuider = sampler_cls, guider_cls
        try:
            yield
        finally:
            nodes_train.TrainSampler, nodes_train.TrainGuider = old
            if dp is not None:
                dp.detach()
