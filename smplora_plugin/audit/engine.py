"""Shared, cached model queries for all attacks, with common random numbers.

:class:`ScoreContext` holds the latents of every audited sample (calibration and evaluation,
members and non-members) and the shared operations that attacks build their statistics from:
:meth:`~ScoreContext.eps` (one counted model pass), :meth:`~ScoreContext.noisy`,
:meth:`~ScoreContext.ddim`, batching, progress bars and a cache that computes each quantity once
(averaged over the mirrored image with ``flip_average``). It computes the loss grid (timesteps x
noise draws) with and without the adapter itself, as most attacks share it; SimA, PIA, SecMI and
CLiD compute theirs in their own modules. Every sample sees the very same ``(t, noise)`` draws,
and so does the base model (common random numbers); the draws come from a seeded generator.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import AuditConfig
from .progress import progress_bar
from .target import AuditError, check_target

__all__ = ["AuditConfig", "ScoreContext", "cpu_settings", "scale_timesteps"]


def scale_timesteps(ts: Sequence[int], T: int) -> List[int]:
    """Timesteps given for T = 1000 rescaled to ``T``: sorted, distinct, clipped to ``[0, T - 1]``."""
    return sorted({min(T - 1, max(0, int(round(t * T / 1000.0)))) for t in ts})


@contextlib.contextmanager
def cpu_settings(num_threads: int) -> Iterator[None]:
    """Torch's CPU thread count set to ``num_threads`` and denormal floats flushed, both restored on exit.

    Denormal floats (near-black images through a small UNet) slow CPU inference ~10x; flushing them
    to zero changes no score measurably. torch cannot report the previous flush mode, so it is reset
    to its default (off).
    """
    old_threads = torch.get_num_threads()
    flushed = torch.set_flush_denormal(True)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)


class ScoreContext:
    """Latents, captions and cached model quantities for ``N`` samples (index order is fixed).

    With ``config.flip_average`` every cached quantity is the mean of its values on the image and
    on its horizontal mirror (both encoded; same noise draws), mirroring flip-augmented training.
    """

    def __init__(self, target: Any, images: torch.Tensor, captions: Optional[List[str]], config: AuditConfig,
                 *, progress: bool = True):
        self.target = target
        self.images = images
        self.captions = captions
        self.config = config
        self.progress = progress
        self.T = int(target.num_train_timesteps)
        self.abar = torch.as_tensor(target.alphas_cumprod, dtype=torch.float64).cpu()
        self.timesteps = scale_timesteps(config.timesteps, self.T)
        self._cache: Dict[str, Any] = {}
        self.passes: Dict[str, int] = {}
        self._views = [self._encode(images)]
        if config.flip_average:
            self._views.append(self._encode(images.flip(-1), "encode (mirrored)"))
        self.latents = self._views[0]
        self.n = self.latents.shape[0]
        gen = torch.Generator().manual_seed(int(config.seed))
        noise = torch.randn((config.draws, *self.latents.shape[1:]), generator=gen)  # (M, C, H, W)
        self.noise = noise.to(self.latents.dtype)
        self.references: Any = None  # a references.ReferenceView when LiRA / RMIA have reference models

    # -- shared operations ------------------------------------------------------------------
    def bar(self, total: int, desc: str) -> Any:
        """A progress bar (``update(n)`` / ``close()``), silent unless the audit shows progress."""
        return progress_bar(total=total, desc=desc, enabled=self.progress)

    def batches(self) -> List[slice]:
        """The sample index in slices of ``config.batch_size``."""
        b = self.config.batch_size
        return [slice(i, min(i + b, self.n)) for i in range(0, self.n, b)]

    def cond(self, sl: slice, captions: Optional[List[str]] = None) -> Any:
        """The condition of samples ``sl`` (their captions, or the null caption without any)."""
        caps = captions if captions is not None else self.captions
        if caps is None:  # no captions: the unconditional (null) condition, one per sample
            return self.target.condition([""] * (sl.stop - sl.start))
        return self.target.condition(list(caps[sl]))

    def eps(self, z: torch.Tensor, t: int, cond: Any, adapter: bool, what: str) -> torch.Tensor:
        """The target's noise prediction at ``(z, t)``, counted under ``passes[what]``."""
        tt = torch.full((z.shape[0],), int(t), dtype=torch.long)
        out = torch.as_tensor(self.target.eps(z, tt, cond, adapter=adapter)).cpu().to(z.dtype)
        if out.shape != z.shape:
            raise AuditError(f"target.eps returned shape {tuple(out.shape)} for latents of shape {tuple(z.shape)}.")
        self.passes[what] = self.passes.get(what, 0) + int(z.shape[0])
        return out

    def noisy(self, z0: torch.Tensor, t: int, e: torch.Tensor) -> torch.Tensor:
        """The forward process: ``sqrt(abar_t) z0 + sqrt(1 - abar_t) e``."""
        a = float(self.abar[t])
        return math.sqrt(a) * z0 + math.sqrt(1 - a) * e

    def ddim(self, z: torch.Tensor, s: int, u: int, e: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step from timestep ``s`` to ``u`` with noise prediction ``e``."""
        a_s, a_u = float(self.abar[s]), float(self.abar[u])
        x0 = (z - math.sqrt(1 - a_s) * e) / math.sqrt(a_s)
        return math.sqrt(a_u) * x0 + math.sqrt(1 - a_u) * e

    def cached(self, key: str, fn: Callable[[], Any], *, views: bool = True) -> Any:
        """``fn()`` once per ``key``; with flip averaging (and ``views``), the mean of ``fn()`` on both views.

        ``views=False`` for quantities derived from cached ones (they are view-averaged already).
        """
        if key not in self._cache:
            if not views:
                self._cache[key] = fn()
            else:
                vals = [self._in_view(v, fn) for v in range(len(self._views))]
                self._cache[key] = vals[0] if len(vals) == 1 else _mean_views(vals)
        return self._cache[key]

    def is_cached(self, key: str) -> bool:
        """Whether ``key`` was computed (e.g. ``"grid:True"``, the adapted loss grid)."""
        return key in self._cache

    def _in_view(self, view: int, fn: Callable[[], Any]) -> Any:
        current = self.latents
        self.latents = self._views[view]
        try:
            return fn()
        finally:
            self.latents = current

    def _encode(self, images: torch.Tensor, desc: str = "encode") -> torch.Tensor:
        """Latents in float32, or float64 when the target encodes to float64 (exact known-answer targets)."""
        out = []
        bar = self.bar(images.shape[0], desc)
        for i in range(0, images.shape[0], self.config.batch_size):
            x = images[i:i + self.config.batch_size]
            z = torch.as_tensor(self.target.encode(x)).cpu()
            out.append(z.double() if z.dtype == torch.float64 else z.float())
            bar.update(x.shape[0])
        bar.close()
        return torch.cat(out)

    # -- the loss grid, shared by most attacks ------------------------------------------------
    def loss_grid(self, adapter: bool = True) -> np.ndarray:
        """``(N, K, M)`` mean squared noise error at each grid timestep and noise draw."""
        return self.cached(f"grid:{adapter}", lambda: self._compute_grid(adapter))[0]

    def loss_map(self) -> np.ndarray:
        """``(N, D)`` squared-error maps of the adapted model averaged over the grid, pooled, flattened."""
        return self.cached("grid:True", lambda: self._compute_grid(True))[1]

    def _compute_grid(self, adapter: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        K, M = len(self.timesteps), self.config.draws
        losses = np.zeros((self.n, K, M))
        maps: Optional[torch.Tensor] = None
        H, W = self.latents.shape[-2:]
        grid = (min(H, self.config.map_grid), min(W, self.config.map_grid)) if self.latents.ndim == 4 else None
        bar = self.bar(self.n * K * M, f"loss grid ({'adapter' if adapter else 'base'})")
        for sl in self.batches():
            z0 = self.latents[sl]
            cond = self.cond(sl)
            acc = torch.zeros_like(z0)
            for k, t in enumerate(self.timesteps):
                for m in range(M):
                    e = self.noise[m].expand_as(z0)
                    err = (self.eps(self.noisy(z0, t, e), t, cond, adapter, "loss") - e).pow(2)
                    losses[sl, k, m] = err.flatten(1).mean(1).double().numpy()
                    acc += err
                    bar.update(z0.shape[0])
            if adapter:
                acc = acc / (K * M)
                if grid is not None and tuple(acc.shape[-2:]) != grid:
                    acc = F.adaptive_avg_pool2d(acc, grid)
                acc = acc.flatten(1)
                maps = acc if maps is None else torch.cat([maps, acc])
        bar.close()
        return losses, None if maps is None else maps.double().numpy()

    def reference_grid(self, r: int) -> np.ndarray:
        """``(N, K, M)`` loss grid of reference model ``r``, at exactly the target's ``(t, noise)`` draws.

        The reference is queried on the target's latents, so it must share the base model (VAE);
        a reference whose latents differ is refused. A reference loaded from a file is dropped
        after its grid is computed.
        """
        def compute() -> np.ndarray:
            if self.references is None:
                raise AuditError("this audit has no reference models.")
            ref = self.references.target(r)
            name = self.references.references.models[r].name
            check_target(ref)
            if int(ref.num_train_timesteps) != self.T or not torch.allclose(
                    torch.as_tensor(ref.alphas_cumprod, dtype=torch.float64).cpu(), self.abar, atol=1e-6):
                raise AuditError(f"{name} has a different noise schedule from the audited target: reference "
                                 "models must share the audited LoRA's base model.")
            b = min(self.n, self.config.batch_size)
            z = torch.as_tensor(ref.encode(self.images[:b])).float().cpu()
            if z.shape != self.latents[:b].shape or not torch.allclose(z, self.latents[:b], atol=1e-4, rtol=1e-4):
                raise AuditError(f"{name} encodes images differently from the audited target: reference models "
                                 "must share the audited LoRA's base model (same VAE).")
            K, M = len(self.timesteps), self.config.draws
            losses = np.zeros((self.n, K, M))
            bar = self.bar(self.n * K * M, f"loss grid ({name})")
            for sl in self.batches():
                z0 = self.latents[sl]
                caps = [""] * (sl.stop - sl.start) if self.captions is None else list(self.captions[sl])
                cond = ref.condition(caps)
                for k, t in enumerate(self.timesteps):
                    for m in range(M):
                        e = self.noise[m].expand_as(z0)
                        tt = torch.full((z0.shape[0],), int(t), dtype=torch.long)
                        out = torch.as_tensor(ref.eps(self.noisy(z0, t, e), tt, cond, adapter=True)).float().cpu()
                        losses[sl, k, m] = (out - e).pow(2).flatten(1).mean(1).double().numpy()
                        bar.update(z0.shape[0])
            bar.close()
            self.passes["reference"] = self.passes.get("reference", 0) + self.n * K * M
            return losses
        return self.cached(f"reference:{r}", compute)

    def reference_grids(self) -> np.ndarray:
        """``(R, N, K, M)``: :meth:`reference_grid` of every reference model."""
        if self.references is None:
            raise AuditError("this audit has no reference models.")
        return np.stack([self.reference_grid(r) for r in range(len(self.references))])

    def pixels(self, max_side: int = 16) -> np.ndarray:
        """Images pooled to at most ``max_side`` per side, flattened: the blind baseline's input."""
        x = self.images.float()
        if x.ndim == 4 and max(x.shape[-2:]) > max_side:
            x = F.adaptive_avg_pool2d(x, (min(max_side, x.shape[-2]), min(max_side, x.shape[-1])))
        return x.flatten(1).double().numpy()


def _mean_views(vals: List[Any]) -> Any:
    """Element-wise mean of per-view results (arrays, or tuples of arrays / None)."""
    if isinstance(vals[0], tuple):
        return tuple(None if parts[0] is None else _mean_views(list(parts)) for parts in zip(*vals))
    return sum(vals) / len(vals)
