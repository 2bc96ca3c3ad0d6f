"""`DPGradients`: DP-SGD's gradient (clip per sample, sum, noise once per step) for a LoRA's parameters.

Per optimiser step, with ``C = max_grad_norm``, ``sigma = noise_multiplier`` and ``B`` the
expected batch size of the step's (logical) batch::

    grad = (sum_i clip_C(g_i) + N(0, (sigma * C)^2 I)) / B

``g_i`` is the gradient of sample ``i``'s own loss with respect to the DP parameters, over all of
them at once (one total L2 norm per sample). Every :meth:`DPGradients.accumulate` call between
two :meth:`DPGradients.step` calls adds to one logical batch (gradient accumulation); the noise is
drawn once, in :meth:`DPGradients.step`, which writes ``p.grad`` for the optimiser. Dividing by
the expected ``B`` rather than the batch's actual size (Opacus's normalisation for mean-reduced
losses) keeps the update's scale independent of who was sampled.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..metadata import validate_entries
from .accountant import DPAccountant, check_delta, check_mechanism, check_sampling, default_delta, noise_multiplier_for
from .errors import DPError
from .per_sample import METHODS, clip_factors, clipped_sum, per_sample_norms

FORMAT = "smplora-dp/1"
_NORMALISATION = "(sum of clipped per-sample gradients + N(0, (sigma*clip)^2)) / expected_batch_size"


def _positive(name: str, value: Any, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DPError(f"{name}={value!r} must be a finite number > 0: {fix}")
    return float(value)


class DPGradients:
    """Differentially private gradients of the trainable (LoRA) parameters of ``target``.

    Example (a raw loop; ``loss_fn`` sees one sample with a leading batch dimension of 1)::

        dp = DPGradients(unet, noise_multiplier=1.0, max_grad_norm=0.05, dataset_size=N, expected_batch_size=8)
        def loss_fn(model, z, t, cond, noise):
            return F.mse_loss(model(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample, noise)
        for idx in PoissonBatchSampler(N, dp.sample_rate, steps, generator=g):
            dp.accumulate(loss_fn, z[idx], t[idx], cond[idx], noise[idx])   # any number of calls per step
            opt.zero_grad(set_to_none=True)
            dp.step()                                                       # noise once; writes p.grad
            opt.step()
        print(dp.summary())

    Args:
        target: a module (its parameters with ``requires_grad``: the LoRA's, when the base is frozen) or
            an iterable of parameters; ``loss_fn``'s first argument is the module, or the tuple of
            parameters, with the per-sample parameters swapped in under ``method="vmap"``.
        max_grad_norm: the clip ``C`` of each sample's total gradient norm.
        noise_multiplier: ``sigma``; the noise per coordinate is ``N(0, (sigma * C)^2)``. Give it, or
            ``target_epsilon`` with ``steps``.
        target_epsilon: choose ``sigma`` so that ``steps`` steps spend at most this epsilon at ``delta``
            (Opacus's ``get_noise_multiplier``, as its ``make_private_with_epsilon``).
        steps: the planned optimiser steps (only with ``target_epsilon``).
        sample_rate, expected_batch_size, dataset_size: ``q``, ``B`` and ``N`` of a logical batch
            (``B = q N``); give any two. Under gradient accumulation ``B`` is the whole step's batch.
        sampling: ``"poisson"`` (batches from :class:`PoissonBatchSampler`: the accountant's assumption)
            or ``"fixed_batch"`` (shuffled batches of exactly ``B``; each step must then hold ``B`` samples,
            and the epsilon is reported as the Poisson accountant's at ``q = B / N``, flagged as such).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus's accountants).
        delta: the delta of the reported epsilon; default ``1 / (N ln N)`` (``1e-5`` for ``N <= 1``).
        generator: the noise's :class:`torch.Generator` (seed it for reproducible runs; default: a
            non-deterministically seeded CPU generator). Its state is part of :meth:`state_dict`.
        method: default per-sample gradient method, ``"vmap"`` or ``"loop"`` (see ``per_sample``).
        chunk_size: samples per vectorised chunk under ``"vmap"`` (bounds memory); ``None`` = all.
        regularizer: the :class:`~smplora_plugin.PrivacyRegularizer` whose per-sample objective is privatised
            (:func:`~smplora_plugin.dp.smp_sample_loss`); recorded in :meth:`summary` and the header, with
            what the epsilon does not cover (its proxy attacker is fit on member features outside the mechanism).
        short_batches: with ``sampling="fixed_batch"``, accept a step of fewer than ``B`` samples (a trainer's
            last batch of an epoch or of an aspect-ratio bucket). Each sample still moves the sum by at most
            ``C`` and the noise is the same, so such a step leaks no more than a full one; the sum is still
            divided by ``B``. A step of more than ``B`` samples is always refused.
    """

    def __init__(self, target: Union[nn.Module, Iterable[torch.Tensor]], *, max_grad_norm: float,
                 noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None,
                 steps: Optional[int] = None, sample_rate: Optional[float] = None,
                 expected_batch_size: Optional[float] = None, dataset_size: Optional[int] = None,
                 sampling: str = "poisson", accountant: str = "rdp", delta: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, method: str = "vmap", chunk_size: Optional[int] = None,
                 regularizer: Any = None, short_batches: bool = False):
        # ---- validate everything before any state is set
        self.module, self.names, self.params = _dp_parameters(target)
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm,
                                       "the clip C of each sample's gradient norm, e.g. 1.0 (or smaller, 0.05, "
                                       "where most per-sample gradients should be clipped).")
        sampling = check_sampling(sampling)
        mechanism = check_mechanism(accountant)
        self.default_method = _check_method(method)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise DPError(f"chunk_size={chunk_size!r} must be a positive int (samples per vmap chunk) or None.")
        q, b, n = _batch_geometry(sample_rate, expected_batch_size, dataset_size, sampling)
        delta = default_delta(n) if delta is None else check_delta(delta)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise DPError(
                "give exactly one of noise_multiplier= (sigma) and target_epsilon= (with steps=, the planned "
                f"optimiser steps), got {'both' if noise_multiplier is not None else 'neither'}: the mechanism "
                "needs one noise level."
            )
        if target_epsilon is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise DPError(f"target_epsilon needs steps= (the planned optimiser steps, a positive int), "
                              f"got {steps!r}.")
            sigma = noise_multiplier_for(target_epsilon, delta=delta, sample_rate=q, steps=steps, mechanism=mechanism)
        else:
            if steps is not None:
                raise DPError("steps= is the planning horizon of target_epsilon= and has no effect with "
                              "noise_multiplier=: drop it, or pass target_epsilon= instead of noise_multiplier=.")
            sigma = _positive("noise_multiplier", noise_multiplier,
                              "sigma > 0 is the noise of the Gaussian mechanism (per-sample clipping without noise has "
                              "no privacy guarantee); use e.g. 1.0, or target_epsilon= with steps=.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DPError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if regularizer is not None and not hasattr(regularizer, "config"):
            raise DPError(f"regularizer must be a PrivacyRegularizer, got {type(regularizer).__name__}.")
        if not isinstance(short_batches, bool) or (short_batches and sampling != "fixed_batch"):
            raise DPError(f"short_batches={short_batches!r}: it is a bool, and only means something with "
                          "sampling='fixed_batch' (Poisson batches have no fixed size).")

        # ---- state
        self.noise_multiplier = sigma
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.planned_steps = steps
        self.sample_rate, self.expected_batch_size, self.dataset_size = q, b, n
        self.sampling = sampling
        self.chunk_size = chunk_size
        self.regularizer = regularizer
        self.short_batches = short_batches
        self.accountant = DPAccountant(mechanism, sample_rate=q, sampling=sampling, delta=delta)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.generator = generator
        self._sum: Optional[List[torch.Tensor]] = None
        self.pending = 0          # samples accumulated since the last step

    # ------------------------------------------------------------------ the mechanism
    @property
    def delta(self) -> float:
        return self.accountant.delta

    @property
    def steps(self) -> int:
        """Optimiser steps taken (noised gradients written)."""
        return self.accountant.steps

    @property
    def clipped_sum(self) -> Optional[Tuple[torch.Tensor, ...]]:
        """The sum of the clipped per-sample gradients accumulated since the last step (fp32; ``None`` if none)."""
        return None if self._sum is None else tuple(self._sum)

    def accumulate(self, loss_fn: Callable[..., torch.Tensor], *sample: torch.Tensor,
                   method: Optional[str] = None) -> torch.Tensor:
        """Add the clipped per-sample gradients of a batch to this step's sum; returns the norms before clipping.

        ``sample`` are tensors with the batch on dimension 0 (an empty batch, as Poisson sampling draws,
        adds nothing); ``loss_fn(target, *one)`` gets one sample ``one`` with a leading dimension of 1
        and returns its scalar loss. Draw random inputs (noise, timesteps) outside and pass them in.
        """
        method = self.default_method if method is None else _check_method(method)
        if not sample or not all(isinstance(x, torch.Tensor) for x in sample):
            raise DPError("accumulate(loss_fn, *sample) needs the batch as tensors with the samples on dimension 0 "
                          "(e.g. dp.accumulate(loss_fn, latents, timesteps, noise)).")
        size = sample[0].shape[0] if sample[0].ndim else None
        if size is None or any(x.ndim == 0 or x.shape[0] != size for x in sample):
            raise DPError(f"the sample tensors have batch sizes {[tuple(x.shape[:1]) for x in sample]}: every tensor "
                          "needs the same batch size on dimension 0 (close over shared inputs inside loss_fn).")
        if self.module is not None:
            _check_no_batchnorm(self.module)
        if size == 0:
            return torch.zeros(0)
        sums, norms = clipped_sum(method, self.module if self.module is not None else self.params, self.names,
                                  self.params, loss_fn, sample, self.max_grad_norm, self.chunk_size)
        if not bool(torch.isfinite(norms).all()):
            raise DPError("a per-sample gradient is NaN or Inf: the loss diverged on a sample; lower the learning "
                          "rate or check the inputs (nothing was accumulated).")
        # ---- state changes from here on
        if self._sum is None:
            self._sum = sums
        else:
            for total, s in zip(self._sum, sums):
                total.add_(s)
        self.pending += int(size)
        return norms.detach()

    def add_per_sample(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Add per-sample gradients computed elsewhere (the trainer's own backward, :class:`.hooks.GradSampleHooks`;
        or a batch of one's ``p.grad``): ``grads[k]`` is ``(B, *shape_k)`` for the k-th DP parameter, row ``i`` the
        gradient of sample ``i``'s own loss. Clips each sample to ``max_grad_norm`` over all parameters, adds the sum
        to this step's; returns the norms before clipping."""
        if not isinstance(grads, (list, tuple)) or len(grads) != len(self.params):
            raise DPError(f"add_per_sample needs one (B, *shape) tensor per DP parameter ({len(self.params)}), got "
                          f"{len(grads) if isinstance(grads, (list, tuple)) else type(grads).__name__}.")
        size = grads[0].shape[0] if isinstance(grads[0], torch.Tensor) and grads[0].ndim else None
        for g, p, name in zip(grads, self.params, self.names):
            if not isinstance(g, torch.Tensor) or g.shape[:1] != (size,) or tuple(g.shape[1:]) != tuple(p.shape):
                raise DPError(f"the per-sample gradient of {name} has shape "
                              f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}; expected "
                              f"({size}, {', '.join(map(str, p.shape))}): one row per sample, the parameter's shape.")
        norms = per_sample_norms(grads)
        if not bool(torch.isfinite(norms).all()):
            raise DPError("a per-sample gradient is NaN or Inf: the loss diverged on a sample (or a GradScaler scaled "
                          "it past float range); lower the learning rate or check the inputs (nothing was added).")
        f = clip_factors(norms, self.max_grad_norm)
        sums = [torch.einsum("b,b...->...", f.to(g.device), g.float()).to(p.device) for g, p in zip(grads, self.params)]
        # ---- state changes from here on
        if self._sum is None:
            self._sum = sums
        else:
            for total, s_ in zip(self._sum, sums):
                total.add_(s_)
        self.pending += int(size)
        return norms.detach()

    def all_reduce(self) -> None:
        """Sum this step's clipped sums and sample counts over the ranks of the process group (a no-op with one
        process). Call it on every rank before :meth:`step`; give every rank the same noise generator seed, so the
        one noise draw per step is the same everywhere and every rank's LoRA stays identical."""
        from .. import distributed
        if not distributed.is_active():
            return
        import torch.distributed as dist
        device = self.params[0].device
        if self._sum is None:
            self._sum = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        flat = torch.cat([s.reshape(-1).to(device) for s in self._sum] +
                         [torch.tensor([float(self.pending)], device=device)])
        dist.all_reduce(flat)
        out, at = [], 0
        for s in self._sum:
            out.append(flat[at:at + s.numel()].reshape(s.shape).to(s.device))
            at += s.numel()
        self._sum, self.pending = out, int(round(float(flat[-1])))

    def step(self) -> None:
        """Noise the accumulated sum once, divide by :attr:`expected_batch_size`, write ``p.grad``, count the step.

        The noise is ``sigma * C * torch.randn(p.shape, generator=generator)`` per parameter, in order, drawn
        on the generator's device. Call the optimiser's ``zero_grad(set_to_none=True)`` first: a gradient
        already on a DP parameter (e.g. from ``loss.backward()``) is not private, and is refused.
        """
        with_grad = [n for n, p in zip(self.names, self.params) if p.grad is not None]
        if with_grad:
            raise DPError(
                f"{len(with_grad)} DP parameter(s) already hold a gradient (e.g. {with_grad[0]}): a gradient from "
                "loss.backward() or an earlier step is not private and would be mixed in. Call "
                "optimizer.zero_grad(set_to_none=True) before dp.step(), and get gradients only through dp.accumulate."
            )
        short_ok = self.short_batches and self.pending < self.expected_batch_size
        if self.sampling == "fixed_batch" and self.pending != self.expected_batch_size and not short_ok:
            raise DPError(
                f"this step accumulated {self.pending} samples, but sampling='fixed_batch' accounts every step as a "
                f"batch of exactly expected_batch_size={self.expected_batch_size:g}: accumulate exactly that many "
                "per step (drop the last, smaller batch: drop_last=True; under gradient accumulation B is the whole "
                "step's batch), or use sampling='poisson' with PoissonBatchSampler."
            )
        std = self.noise_multiplier * self.max_grad_norm
        grads = []
        for i, p in enumerate(self.params):
            noise = torch.randn(p.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
            total = noise.to(p.device) * std
            if self._sum is not None:
                total = total + self._sum[i]
            grads.append(total / self.expected_batch_size)
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        self.accountant.step(self.noise_multiplier)
        self._sum, self.pending = None, 0

    # ------------------------------------------------------------------ reporting
    def epsilon(self, delta: Optional[float] = None) -> float:
        """The epsilon spent so far at ``delta`` (default :attr:`delta`). A number without its assumption:
        report it with :meth:`summary` or :meth:`privacy_spent`, which carry the sampling."""
        return self.accountant.epsilon(delta)

    def privacy_spent(self) -> Dict[str, Any]:
        """The figures of the ``smplora.dp`` header entry (see :meth:`file_metadata`)."""
        out = {"epsilon": self.epsilon(), "delta": self.delta, "sigma": self.noise_multiplier,
               "clip": self.max_grad_norm, "sampling": self.sampling, "sample_rate": self.sample_rate,
               "steps": self.steps, "accountant": self.accountant.mechanism,
               "expected_batch_size": self.expected_batch_size, "dataset_size": self.dataset_size,
               "normalisation": _NORMALISATION, "assumption": self.accountant.note(), "objective": self._objective()}
        if self.target_epsilon is not None:
            out.update(target_epsilon=self.target_epsilon, planned_steps=self.planned_steps)
        caveat = self._attacker_caveat()
        if caveat:
            out["caveat"] = caveat
        return out

    def summary(self) -> str:
        """One paragraph: epsilon at delta, with the sampling it assumes and what it covers."""
        text = (f"{self._objective()}: epsilon {self.epsilon():.4g} at delta {self.delta:.3g} after {self.steps} "
                f"steps ({self.accountant.mechanism} accountant; {self.accountant.note()}); sigma "
                f"{self.noise_multiplier:.4g}, clip {self.max_grad_norm:.4g}, expected batch "
                f"{self.expected_batch_size:g} of {self.dataset_size}.")
        if self.target_epsilon is not None:
            text += f" Target epsilon {self.target_epsilon:g} over {self.planned_steps} planned steps."
        caveat = self._attacker_caveat()
        return text + (f" {caveat}" if caveat else "")

    __repr__ = summary

    def file_metadata(self) -> Dict[str, str]:
        """``{"smplora.dp": JSON of privacy_spent()}`` for a saved LoRA's header (``reg.annotate(path, extra=...)``)."""
        return validate_entries({"smplora.dp": json.dumps(self.privacy_spent(), sort_keys=True)})

    def _objective(self) -> str:
        if self.regularizer is None:
            return "dp-sgd"
        return ("smp-lora" if self.regularizer.config.objective == "smp" else "mp-lora") + " + dp noise"

    def _attacker_caveat(self) -> Optional[str]:
        if self.regularizer is None or self.regularizer.config.k_steps == 0:
            return None
        return ("The proxy attacker is trained on member features without clipping or noise, so this epsilon is the "
                "accountant's figure for the noised LoRA updates given the attacker, not a guarantee for the whole "
                "run (the attacker carries member information into later steps).")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """``dp.meta`` (JSON: settings, steps, accountant history) and ``dp.rng`` (the noise generator's state):
        strings and tensors, ready for safetensors. Taken between steps (nothing accumulated)."""
        if self.pending:
            raise DPError(f"{self.pending} samples are accumulated but not yet stepped: "
                          "take the state after dp.step().")
        meta = {"format": FORMAT, "sigma": self.noise_multiplier, "clip": self.max_grad_norm,
                "sampling": self.sampling, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size, "dataset_size": self.dataset_size,
                "accountant": self.accountant.to_dict(), "steps": self.steps,
                "rng_device": str(self.generator.device)}
        return {"dp.meta": json.dumps(meta, sort_keys=True), "dp.rng": self.generator.get_state().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validated whole first: another sigma, clip, sampling, sample rate,
        batch, accountant or delta is refused (resume with the settings that were saved)."""
        try:
            meta = json.loads(state["dp.meta"])
            rng = state["dp.rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DPError(f"not a DPGradients state ({exc}): pass dp.state_dict() output.") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DPError(f"not a DPGradients state (expected format {FORMAT!r}).")
        if self.pending:
            raise DPError(f"{self.pending} samples are accumulated in this object: load the state before accumulating.")
        acc = meta.get("accountant")
        if not isinstance(acc, dict):
            raise DPError("the state has no accountant record; it is corrupt: re-save it with dp.state_dict().")
        mine = {"sigma": self.noise_multiplier, "clip": self.max_grad_norm, "sampling": self.sampling,
                "sample_rate": self.sample_rate, "expected_batch_size": self.expected_batch_size,
                "dataset_size": self.dataset_size, "accountant": self.accountant.mechanism, "delta": self.delta}
        theirs = dict(meta, accountant=acc.get("mechanism"), delta=acc.get("delta"))
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            details = ", ".join(f"{k}: saved {theirs.get(k)!r} vs this {mine[k]!r}" for k in diff)
            raise DPError(f"the state was saved with other DP settings ({details}): a resumed run must keep them, or "
                          "its accounting is wrong. Construct DPGradients with the saved settings.")
        history = DPAccountant.history_from(acc.get("history"))
        if sum(n for _, _, n in history) != meta.get("steps"):
            raise DPError("the state's step count does not match its accountant history; the state is corrupt.")
        probe = torch.Generator(device=self.generator.device)
        try:
            probe.set_state(rng)
        except (TypeError, RuntimeError) as exc:
            raise DPError(f"the noise generator state is corrupt or from a generator on another device ({exc}); "
                          f"pass a generator on {meta.get('rng_device')}.") from exc
        # ---- state changes from here on
        self.generator.set_state(rng)
        self.accountant.history = history


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise DPError(f"method={method!r} is not one of {METHODS}: 'vmap' (torch.func, vectorised) or 'loop' "
                      "(a backward per sample, for models vmap cannot run).")
    return method


def _dp_parameters(target) -> Tuple[Optional[nn.Module], Tuple[str, ...], Tuple[torch.Tensor, ...]]:
    """``(module or None, names, parameters)`` of the DP parameters, checked."""
    if isinstance(target, nn.Module):
        named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
        module = target
    else:
        try:
            params = list(target)
        except TypeError:
            raise DPError(f"target must be a torch.nn.Module or an iterable of parameters, got "
                          f"{type(target).__name__}.") from None
        named = [(f"param{i}", p) for i, p in enumerate(params)]
        module = None
    if not named:
        raise DPError("no trainable parameters: add the LoRA (its parameters with requires_grad=True) before building "
                      "DPGradients, or pass the LoRA parameters themselves.")
    seen = set()
    for n, p in named:
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or not p.requires_grad or not p.is_leaf:
            raise DPError(f"{n} cannot take per-sample gradients: every DP parameter must be a floating-point leaf "
                          "tensor with requires_grad=True (an nn.Parameter of the LoRA).")
        if id(p) in seen:
            raise DPError(f"{n} is listed twice: pass each LoRA parameter once.")
        seen.add(id(p))
    return module, tuple(n for n, _ in named), tuple(p for _, p in named)


def _check_no_batchnorm(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise DPError(f"{name or 'the model'} is a BatchNorm in training mode: it mixes the samples of a batch, "
                          "so per-sample gradients are undefined. Put it in eval mode or replace it with GroupNorm.")


def _batch_geometry(q, b, n, sampling) -> Tuple[float, float, int]:
    """``(sample_rate, expected_batch_size, dataset_size)`` from any two of them, checked."""
    given = sum(v is not None for v in (q, b, n))
    if given < 2:
        raise DPError("give two of sample_rate= (q), expected_batch_size= (B) and dataset_size= (N), with B = q N: "
                      "the accountant needs q and the normalisation B.")
    if q is not None:
        q = _positive("sample_rate", q, "the probability that a sample joins a step's batch, in (0, 1].")
        if q > 1:
            raise DPError(f"sample_rate={q} is above 1: q = B / N is a probability in (0, 1].")
    if b is not None:
        b = _positive("expected_batch_size", b, "the expected samples per optimiser step (q N).")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DPError(f"dataset_size={n!r} must be a positive int (the number of training samples N).")
    if q is None:
        q = b / n
        if q > 1:
            raise DPError(f"expected_batch_size={b:g} is larger than dataset_size={n}: "
                          "a batch is at most the data set.")
    elif b is None:
        b = q * n
    elif n is None:
        n = max(1, int(round(b / q)))
    elif abs(q * n - b) > 1e-6 * max(1.0, b):
        raise DPError(f"sample_rate={q:g} x dataset_size={n} = {q * n:g} is not expected_batch_size={b:g}: give two of "
                      "the three, or consistent values.")
    if sampling == "fixed_batch" and abs(b - round(b)) > 1e-9:
        raise DPError(f"sampling='fixed_batch' needs a whole expected_batch_size (the fixed batch), got {b:g}.")
    return q, (float(round(b)) if sampling == "fixed_batch" else b), n
