"""DP-SGD inside a trainer you do not control: ``DPOptions`` (the user's choice, checked) and ``DPTraining``.

A trainer (kohya, diffusers' scripts, ai-toolkit, ComfyUI) computes its loss, calls ``backward()``
and then ``optimizer.step()``. ``DPTraining`` turns that into a DP-SGD step without changing the
trainer's loop:

1. **Per-sample gradients** of the trainer's own loss: by hooks on the LoRA layers during its
   backward (``capture="hooks"``, :class:`.hooks.GradSampleHooks`), or, where the LoRA is merged
   into the weights so no hook fires, from ``p.grad`` after a backward on a batch of one
   (``capture="grads"``).
2. :meth:`DPTraining.collect` clips each sample to ``max_grad_norm`` and adds it to the step's sum
   (:meth:`.DPGradients.add_per_sample`). The trainer's shim calls it at the start of every
   micro-batch's loss (the previous backward is over by then); the optimiser hook calls it too.
3. An optimiser **step pre-hook** (on the innermost torch optimiser, so it fires only on real
   steps, after gradient accumulation) sums the clipped gradients over ranks, **discards the
   trainer's own gradient** (it is not private), writes ``(sum + N(0, (sigma C)^2)) / B`` into
   ``p.grad`` and counts the step in the accountant; then the optimiser steps on it. What the
   trainer did to its gradient between backward and step (kohya's ``--max_grad_norm`` clipping of
   the whole gradient) acts on the discarded gradient and has no effect.

With several ranks every rank's noise generator gets the same seed, the clipped sums are summed
over ranks before the noise, and so the one noise draw per step and every rank's LoRA are the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .accountant import check_delta, check_mechanism
from .errors import DPError
from .gradients import DPGradients
from .hooks import GradSampleHooks

CAPTURES = ("hooks", "grads")
#: the privacy methods that mean DP-SGD alone (no SMP-LoRA term)
DP_ONLY = ("dpsgd",)
DEFAULT_MAX_GRAD_NORM = 1.0


def _number(name: str, value: Any, fix: str, *, positive: bool = True) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise DPError(f"{name}={value!r} must be a finite number > 0: {fix}")
    return float(value)


@dataclass(frozen=True)
class DPOptions:
    """What the user asked for (checked by :func:`dp_options`); the same words in every trainer:
    ``noise_multiplier`` (sigma) or ``target_epsilon``, ``max_grad_norm`` (the per-sample clip C),
    ``delta`` (``None``: ``1/(N ln N)``), ``accountant`` (``rdp`` / ``prv``), ``seed`` (the noise
    generator's; the same on every rank)."""

    noise_multiplier: Optional[float]
    max_grad_norm: float
    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    accountant: str = "rdp"
    seed: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _method_flag(flag: str) -> str:
    """How the trainer spells choosing DP-SGD: ``--privacy dpsgd`` style for ``--privacy_``, ``privacy.method: dpsgd``
    for a config block (``privacy.``), ``<flag>objective dpsgd`` otherwise (ComfyUI's ``privacy_``)."""
    if flag.endswith("."):
        return f"{flag}method: dpsgd"
    if flag.startswith("--"):
        return f"{flag[:-1] if flag.endswith('_') else flag} dpsgd"
    return f"{flag}objective dpsgd"


def dp_options(method: str, *, noise_multiplier: Any = None, max_grad_norm: Any = None, target_epsilon: Any = None,
               delta: Any = None, accountant: Any = "rdp", seed: Any = 0,
               flag: str = "--privacy_") -> Optional[DPOptions]:
    """The DP part of a trainer's privacy options, or ``None`` when the run has no DP noise.

    ``method="dpsgd"`` is DP-SGD alone; any other privacy method with ``noise_multiplier`` or ``target_epsilon``
    is that method's objective under DP noise (SMP-LoRA + DP). ``flag`` is how the trainer spells the options
    (``--privacy_`` for kohya / diffusers, ``privacy.`` for a YAML block), for the error messages; the DP delta
    and accountant are spelled ``dp_delta`` / ``dp_accountant`` there (``--privacy_delta`` is SMP-LoRA's
    denominator constant). Everything is checked here, before a trainer builds anything.
    """
    sigma = _number(f"{flag}noise_multiplier", noise_multiplier,
                    "sigma is the noise of the Gaussian mechanism (clipping without noise has no privacy guarantee); "
                    f"use e.g. 1.0, or {flag}target_epsilon instead.")
    clip = _number(f"{flag}max_grad_norm", max_grad_norm,
                   "the clip C of each sample's gradient norm over the LoRA's parameters, e.g. 1.0 (or 0.05, where "
                   "most per-sample gradients are clipped).")
    target = _number(f"{flag}target_epsilon", target_epsilon,
                     "the epsilon to spend over the planned steps, e.g. 8; sigma is then chosen for it.")
    if delta is not None:
        try:
            delta = check_delta(delta)
        except DPError:
            raise DPError(f"{flag}dp_delta={delta!r} is outside (0, 1): pass a probability such as 1e-5, or leave "
                          "it out for the default 1/(N ln N) of N training images.") from None
    try:
        accountant = check_mechanism(accountant)
    except DPError:
        raise DPError(f"{flag}dp_accountant={accountant!r} is not 'rdp' (Renyi DP, the default) or 'prv' (privacy "
                      "random variables, tighter and slower).") from None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DPError(f"the DP noise seed must be an int, got {seed!r}.")
    noised = sigma is not None or target is not None
    if method in DP_ONLY and not noised:
        raise DPError(f"{_method_flag(flag)} needs a noise level: pass "
                      f"{flag}noise_multiplier (sigma, e.g. 1.0) or {flag}target_epsilon (e.g. 8).")
    if not noised:
        given = [n for n, v in (("max_grad_norm", clip), ("dp_delta", delta)) if v is not None]
        if given:
            raise DPError(f"{', '.join(flag + g for g in given)} given without a DP mechanism: these options only act "
                          f"with DP noise. Pass {flag}noise_multiplier or {flag}target_epsilon (DP-SGD, or "
                          f"SMP-LoRA + DP noise), or drop them.")
        return None
    if sigma is not None and target is not None:
        raise DPError(f"give one of {flag}noise_multiplier and {flag}target_epsilon, not both: the target chooses "
                      "sigma for the planned steps.")
    return DPOptions(noise_multiplier=sigma, max_grad_norm=DEFAULT_MAX_GRAD_NORM if clip is None else clip,
                     target_epsilon=target, delta=delta, accountant=accountant, seed=seed)


def check_mixed_precision(mixed_precision: Any) -> None:
    """Refuse fp16 loss scaling: per-sample gradients would be clipped at the scaled norm (and a skipped step
    would still be counted). bf16 autocast and fp32 are fine."""
    if str(mixed_precision).lower() in ("fp16", "float16", "torch.float16"):
        raise DPError("DP noise with fp16 mixed precision is not supported: its GradScaler scales the loss, so "
                      "per-sample gradients would be clipped at the scaled norm. Use bf16 (or no) mixed precision.")


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser under wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise DPError(f"the trainer's optimiser ({type(optimizer).__name__}) is not a torch.optim.Optimizer: DP noise "
                      "is written into p.grad by an optimiser step pre-hook, which needs one.")
    return optimizer


class DPTraining:
    """DP-SGD on a trainer's LoRA: per-sample gradients of its own loss, clipped, summed, noised at each optimiser step.

    Args:
        network: the module holding the LoRA layers; its parameters with ``requires_grad`` are the DP parameters.
        options: from :func:`dp_options`.
        dataset_size: ``N``, the training images (rows: a repeated image counts once per row).
        batch_size: the images per optimiser step over all ranks (micro-batch x accumulation x ranks): ``B``.
        planned_steps: the optimiser steps the run plans (for ``target_epsilon``).
        backward_scale: what the trainer multiplies its batch-mean loss by before ``backward()`` (accelerate
            divides by the accumulation steps: ``1 / accumulation``).
        capture: ``"hooks"`` (per-sample gradients by hooks on the LoRA layers) or ``"grads"`` (every backward
            is on one sample: its ``p.grad`` is that sample's gradient).
        regularizer: the :class:`~smplora_plugin.PrivacyRegularizer` whose per-sample objective is trained
            (:meth:`~smplora_plugin.PrivacyRegularizer.step_per_sample`); ``None`` for DP-SGD alone.
        sampling: ``"fixed_batch"`` (the trainers' shuffled batches; short last batches accepted, the epsilon is
            flagged as the Poisson accountant's figure) or ``"poisson"`` (the trainer draws Poisson batches).
    """

    def __init__(self, network: nn.Module, options: DPOptions, *, dataset_size: int, batch_size: int,
                 planned_steps: Optional[int] = None, backward_scale: float = 1.0, capture: str = "hooks",
                 regularizer: Any = None, sampling: str = "fixed_batch"):
        if not isinstance(options, DPOptions):
            raise DPError(f"options must be DPOptions (from dp_options(...)), got {type(options).__name__}.")
        if capture not in CAPTURES:
            raise DPError(f"capture={capture!r} is not one of {CAPTURES}.")
        _number("backward_scale", backward_scale, "the factor the trainer applies to its loss before backward().")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DPError(f"batch_size={batch_size!r} must be a positive int: the images of one optimiser step.")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < batch_size:
            raise DPError(f"dataset_size={dataset_size!r} must be an int of at least the batch ({batch_size}): "
                          "the training images the accountant counts.")
        if options.target_epsilon is not None and (not isinstance(planned_steps, int) or planned_steps < 1):
            raise DPError("a target epsilon needs the planned optimiser steps (set the trainer's max steps / epochs).")
        generator = torch.Generator().manual_seed(options.seed)
        self.dp = DPGradients(network, max_grad_norm=options.max_grad_norm,
                              noise_multiplier=options.noise_multiplier, target_epsilon=options.target_epsilon,
                              steps=planned_steps if options.target_epsilon is not None else None,
                              dataset_size=dataset_size, expected_batch_size=batch_size, sampling=sampling,
                              short_batches=sampling == "fixed_batch", accountant=options.accountant,
                              delta=options.delta, generator=generator, method="loop", regularizer=regularizer)
        self.hooks = GradSampleHooks(network, self.dp.params) if capture == "hooks" else None
        self.options = options
        self.capture = capture
        self.backward_scale = float(backward_scale)
        self.planned_steps = planned_steps
        self._handle: Optional[Any] = None
        self.last_norms: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer: Any) -> None:
        """Hook the LoRA layers and the optimiser. Every parameter the optimiser trains must be a DP parameter."""
        inner = innermost_optimizer(optimizer)
        mine = {id(p) for p in self.dp.params}
        foreign = [p for g in inner.param_groups for p in g["params"] if p.requires_grad and id(p) not in mine]
        if foreign:
            raise DPError(f"the optimiser trains {len(foreign)} parameter(s) outside the LoRA network (e.g. a shape "
                          f"{tuple(foreign[0].shape)}): their gradients would not be private. Train the LoRA only.")
        if self.hooks is not None:
            self.hooks.attach()
        if self._handle is None:
            self._handle = inner.register_step_pre_hook(self._before_step)

    def detach(self) -> None:
        if self.hooks is not None:
            self.hooks.detach()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ the step
    def collect(self) -> Optional[torch.Tensor]:
        """Clip and add the per-sample gradients of the backward passes since the last call; returns their norms
        before clipping (``None`` if no backward ran). Call it before each micro-batch's loss."""
        if self.hooks is not None:
            grads = self.hooks.take(1.0 / self.backward_scale, mean_reduced=True)
        else:
            if all(p.grad is None for p in self.dp.params):
                return None
            grads = [(torch.zeros_like(p) if p.grad is None else p.grad.detach()).unsqueeze(0) / self.backward_scale
                     for p in self.dp.params]
            for p in self.dp.params:
                p.grad = None
        if grads is None:
            return None
        self.last_norms = self.dp.add_per_sample(grads)
        return self.last_norms

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.collect()
        self.dp.all_reduce()
        for p in self.dp.params:        # the trainer's own gradient is not private: discarded
            p.grad = None
        self.dp.step()

    # ------------------------------------------------------------------ reporting
    def epsilon(self) -> float:
        return self.dp.epsilon()

    def postfix(self) -> Dict[str, str]:
        """For the progress bar: ``eps`` (at the run's delta; the sampling is in the summary and header)."""
        return {"eps": f"{self.epsilon():.3g}"}

    def metrics(self) -> Dict[str, float]:
        """For trackers: ``smplora/epsilon``, ``smplora/dp_steps`` and the last step's median per-sample norm."""
        out = {"smplora/epsilon": float(self.epsilon()), "smplora/dp_steps": float(self.dp.steps)}
        if self.last_norms is not None and self.last_norms.numel():
            out["smplora/dp_grad_norm_median"] = float(self.last_norms.median())
        return out

    def summary(self) -> str:
        return self.dp.summary()

    def lines(self) -> List[str]:
        """The settings for a trainer's summary box, before training."""
        d = self.dp
        sig = (f"sigma {d.noise_multiplier:.4g} (chosen for target epsilon {self.options.target_epsilon:g} over "
               f"{self.planned_steps} steps)" if self.options.target_epsilon is not None
               else f"sigma {d.noise_multiplier:.4g}")
        return [f"DP noise: {sig}, per-sample clip {d.max_grad_norm:.4g}, batch {d.expected_batch_size:g} of "
                f"{d.dataset_size}, delta {d.delta:.3g} ({d.accountant.mechanism} accountant)",
                f"DP sampling: {d.accountant.note()}",
                f"DP per-sample gradients: {'hooks on the LoRA layers' if self.hooks else 'one sample per backward'}"]

    def file_metadata(self) -> Dict[str, str]:
        return self.dp.file_metadata()

    def state_dict(self) -> Dict[str, Any]:
        return self.dp.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.dp.load_state_dict(state)
