"""Per-sample gradients, clipped and summed: ``sum_i g_i * min(1, C / ||g_i||)``.

Two ways to get ``g_i``, with the same loss function (``loss_fn(target, *sample)``, where
``sample`` is one sample with a leading batch dimension of 1):

* ``"vmap"``: ``torch.func.vmap(torch.func.grad(...))`` through ``torch.func.functional_call``:
  one vectorised pass; memory grows with ``batch x trainable parameters``.
* ``"loop"``: one forward and backward per sample: slow, any model (in-place ops, hooks,
  checkpointing), memory of one sample.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import SmploraError
from .errors import DPError

METHODS = ("vmap", "loop")
Target = Union[nn.Module, Tuple[torch.Tensor, ...]]


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``C / max(||g_i||, C)``: 1 for gradients within the bound, exactly onto it beyond."""
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def per_sample_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Total L2 norm per sample over all parameters; ``grads[k]`` is ``(B, *shape_k)``."""
    return torch.stack([g.float().reshape(g.shape[0], -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()


class _LossCall(nn.Module):
    """``loss_fn(model, *sample)`` as a module, so that ``functional_call`` swaps the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *sample):
        return self.loss_fn(self.model, *sample)


def clipped_sum(method: str, target: Target, names: Sequence[str], params: Sequence[torch.Tensor], loss_fn: Callable,
                samples: Sequence[torch.Tensor], max_grad_norm: float,
                chunk_size=None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``(sums, norms)``: the clipped per-sample gradients summed per parameter (fp32), and the norms before
    clipping."""
    if method == "vmap":
        grads = _vmap_grads(target, names, params, loss_fn, samples, chunk_size)
        norms = per_sample_norms(grads)
        f = clip_factors(norms, max_grad_norm)
        return [torch.einsum("b,b...->...", f.to(g.device), g.float()) for g in grads], norms
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    norms = []
    for i in range(samples[0].shape[0]):
        g = [x.unsqueeze(0) for x in _sample_grad(target, params, loss_fn, [s[i:i + 1] for s in samples])]
        norm = per_sample_norms(g)
        f = clip_factors(norm, max_grad_norm)[0]
        for total, gi in zip(sums, g):
            total.add_(gi[0].float() * f.to(gi.device))
        norms.append(norm)
    return sums, torch.cat(norms)


def _vmap_grads(target, names, params, loss_fn, samples, chunk_size) -> List[torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    detached = tuple(p.detach() for p in params)
    if isinstance(target, nn.Module):
        call = _LossCall(target, loss_fn)

        def one(ps, *sample):
            sample = tuple(x.unsqueeze(0) for x in sample)
            return _scalar(functional_call(call, {f"model.{n}": p for n, p in zip(names, ps)}, sample))
    else:
        def one(ps, *sample):
            return _scalar(loss_fn(tuple(ps), *(x.unsqueeze(0) for x in sample)))

    in_dims = (None,) + (0,) * len(samples)
    try:
        return list(vmap(grad(one), in_dims=in_dims, randomness="different", chunk_size=chunk_size)(detached, *samples))
    except SmploraError:
        raise
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        raise DPError(
            f"per-sample gradients could not be computed with torch.func.vmap ({type(exc).__name__}: {exc}). "
            "Use method='loop' (a forward and backward per sample, works with any model), or make loss_fn "
            "vmap-safe: no in-place updates of buffers, no .item() or data-dependent Python branches."
        ) from exc


def _scalar(loss):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise DPError(f"loss_fn returned {shape} for one sample: it must return that sample's scalar loss "
                      "(reduce with .mean() over the sample's elements).")
    return loss.reshape(())


def _sample_grad(target, params, loss_fn, sample) -> List[torch.Tensor]:
    with torch.enable_grad():
        loss = _scalar(loss_fn(target if isinstance(target, nn.Module) else tuple(params), *sample))
        if not loss.requires_grad:
            raise DPError("the loss of a sample does not depend on the DP parameters (is loss_fn run under "
                          "torch.no_grad(), or are the LoRA parameters frozen?); per-sample gradients need it to.")
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
