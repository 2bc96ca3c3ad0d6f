"""Shared, cached model queries for all attacks, with common random numbers.

:class:`ScoreContext` holds the latents of every audited sample (calibration and evaluation,
members and non-members) and computes each model quantity once for all of them: the loss grid
(timesteps x noise draws) with and without the adapter, SimA norms, PIA and SecMI scores and the
CLiD reduced-caption losses. Every sample sees the very same ``(t, noise)`` draws, and so does
the base model (common random numbers); the draws come from a seeded generator.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .target import AuditError, check_target


@dataclass
class AuditConfig:
    """Knobs of the attack suite. Timesteps are given for T = 1000 and rescaled to the target's T."""

    seed: int = 0
    batch_size: int = 64
    timesteps: Tuple[int, ...] = (50, 100, 150, 200, 250, 300, 350, 400, 450, 500)
    draws: int = 4
    sima_timesteps: Tuple[int, ...] = (10, 50, 100, 200, 300)
    pia_timesteps: Tuple[int, ...] = (100, 200, 300, 500)
    pia_p: float = 4.0
    secmi_t: int = 100
    secmi_step: int = 10
    clid_timesteps: Tuple[int, ...] = (100, 200, 300)
    clid_reductions: int = 4  # k reduced captions; the last one is the null caption
    map_grid: int = 32  # loss maps for the trained MLP are pooled to at most this size per side
    mlp_hidden: Tuple[int, ...] = (512, 256)
    mlp_dropout: float = 0.5
    mlp_lr: float = 1e-3
    mlp_weight_decay: float = 1e-4
    mlp_max_epochs: int = 200
    mlp_patience: int = 30
    mlp_fit_fraction: float = 0.6  # of the calibration split; the rest early-stops the MLP
    n_boot: int = 1000
    cv_folds: int = 5

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AuditConfig":
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - names
        if unknown:
            raise AuditError(f"unknown audit config field(s) {sorted(unknown)}; valid fields: {sorted(names)}.")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def validate(self) -> None:
        if self.draws < 1 or self.batch_size < 1:
            raise AuditError("draws and batch_size must be >= 1.")
        if not self.timesteps:
            raise AuditError("timesteps must list at least one timestep.")
        if self.secmi_step < 1 or self.secmi_t <= self.secmi_step:
            raise AuditError("secmi_t must be larger than secmi_step >= 1 (defaults: 100 and 10).")
        if not 0 < self.mlp_fit_fraction < 1:
            raise AuditError("mlp_fit_fraction must be in (0, 1).")


def _scale_t(ts: Sequence[int], T: int) -> List[int]:
    out = sorted({min(T - 1, max(0, int(round(t * T / 1000.0)))) for t in ts})
    return out


class ScoreContext:
    """Latents, captions and cached model quantities for ``N`` samples (index order is fixed)."""

    def __init__(self, target: Any, images: torch.Tensor, captions: Optional[List[str]], config: AuditConfig,
                 *, progress: bool = True):
        self.target = target
        self.images = images
        self.captions = captions
        self.config = config
        self.progress = progress
        self.T = int(target.num_train_timesteps)
        self.abar = torch.as_tensor(target.alphas_cumprod, dtype=torch.float64).cpu()
        self.timesteps = _scale_t(config.timesteps, self.T)
        self.sima_timesteps = _scale_t(config.sima_timesteps, self.T)
        self.pia_timesteps = [t for t in _scale_t(config.pia_timesteps, self.T) if t > 0]
        self.clid_timesteps = _scale_t(config.clid_timesteps, self.T)
        self.secmi_t = max(2, int(round(config.secmi_t * self.T / 1000.0)))
        self.secmi_step = max(1, int(round(config.secmi_step * self.T / 1000.0)))
        self._cache: Dict[str, Any] = {}
        self.latents = self._encode()
        self.n = self.latents.shape[0]
        gen = torch.Generator().manual_seed(int(config.seed))
        self.noise = torch.randn((config.draws, *self.latents.shape[1:]), generator=gen)  # (M, C, H, W)
        self.passes: Dict[str, int] = {}
        self.references: Any = None  # a references.ReferenceView when LiRA / RMIA have reference models

    # -- plumbing -------------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        from .progress import progress_bar

        return progress_bar(total=total, desc=desc, enabled=self.progress)

    def _batches(self) -> List[slice]:
        b = self.config.batch_size
        return [slice(i, min(i + b, self.n)) for i in range(0, self.n, b)]

    def _encode(self) -> torch.Tensor:
        out = []
        bar = self._bar(self.images.shape[0], "encode")
        for i in range(0, self.images.shape[0], self.config.batch_size):
            x = self.images[i:i + self.config.batch_size]
            z = self.target.encode(x)
            out.append(torch.as_tensor(z).float().cpu())
            bar.update(x.shape[0])
        bar.close()
        return torch.cat(out)

    def _cond(self, sl: slice, captions: Optional[List[str]] = None) -> Any:
        caps = captions if captions is not None else self.captions
        if caps is None:  # no captions: the unconditional (null) condition, one per sample
            return self.target.condition([""] * (sl.stop - sl.start))
        return self.target.condition(list(caps[sl]))

    def _eps(self, z: torch.Tensor, t: int, cond: Any, adapter: bool, what: str) -> torch.Tensor:
        tt = torch.full((z.shape[0],), int(t), dtype=torch.long)
        out = torch.as_tensor(self.target.eps(z, tt, cond, adapter=adapter)).float().cpu()
        if out.shape != z.shape:
            raise AuditError(f"target.eps returned shape {tuple(out.shape)} for latents of shape {tuple(z.shape)}.")
        self.passes[what] = self.passes.get(what, 0) + int(z.shape[0])
        return out

    def _noisy(self, z0: torch.Tensor, t: int, e: torch.Tensor) -> torch.Tensor:
        a = float(self.abar[t])
        return math.sqrt(a) * z0 + math.sqrt(1 - a) * e

    def _ddim(self, z: torch.Tensor, s: int, u: int, e: torch.Tensor) -> torch.Tensor:
        a_s, a_u = float(self.abar[s]), float(self.abar[u])
        x0 = (z - math.sqrt(1 - a_s) * e) / math.sqrt(a_s)
        return math.sqrt(a_u) * x0 + math.sqrt(1 - a_u) * e

    def _cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # -- quantities -----------------------------------------------------------------------
    def loss_grid(self, adapter: bool = True) -> np.ndarray:
        """``(N, K, M)`` mean squared noise error at each grid timestep and noise draw."""
        return self._cached(f"grid:{adapter}", lambda: self._compute_grid(adapter))[0]

    def loss_map(self) -> np.ndarray:
        """``(N, D)`` squared-error maps of the adapted model averaged over the grid, pooled, flattened."""
        return self._cached("grid:True", lambda: self._compute_grid(True))[1]

    def _compute_grid(self, adapter: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        K, M = len(self.timesteps), self.config.draws
        losses = np.zeros((self.n, K, M))
        maps: Optional[torch.Tensor] = None
        H, W = self.latents.shape[-2:]
        grid = (min(H, self.config.map_grid), min(W, self.config.map_grid)) if self.latents.ndim == 4 else None
        bar = self._bar(self.n * K * M, f"loss grid ({'adapter' if adapter else 'base'})")
        for sl in self._batches():
            z0 = self.latents[sl]
            cond = self._cond(sl)
            acc = torch.zeros_like(z0)
            for k, t in enumerate(self.timesteps):
                for m in range(M):
                    e = self.noise[m].expand_as(z0)
                    err = (self._eps(self._noisy(z0, t, e), t, cond, adapter, "loss") - e).pow(2)
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
            bar = self._bar(self.n * K * M, f"loss grid ({name})")
            for sl in self._batches():
                z0 = self.latents[sl]
                caps = [""] * (sl.stop - sl.start) if self.captions is None else list(self.captions[sl])
                cond = ref.condition(caps)
                for k, t in enumerate(self.timesteps):
                    for m in range(M):
                        e = self.noise[m].expand_as(z0)
                        tt = torch.full((z0.shape[0],), int(t), dtype=torch.long)
                        out = torch.as_tensor(ref.eps(self._noisy(z0, t, e), tt, cond, adapter=True)).float().cpu()
                        losses[sl, k, m] = (out - e).pow(2).flatten(1).mean(1).double().numpy()
                        bar.update(z0.shape[0])
            bar.close()
            self.passes["reference"] = self.passes.get("reference", 0) + self.n * K * M
            return losses
        return self._cached(f"reference:{r}", compute)

    def reference_grids(self) -> np.ndarray:
        """``(R, N, K, M)``: :meth:`reference_grid` of every reference model."""
        if self.references is None:
            raise AuditError("this audit has no reference models.")
        return np.stack([self.reference_grid(r) for r in range(len(self.references))])

    def sima(self, adapter: bool = True) -> np.ndarray:
        """``(N, len(sima_timesteps))`` mean squared norm of eps on the clean latent."""
        def compute() -> np.ndarray:
            out = np.zeros((self.n, len(self.sima_timesteps)))
            bar = self._bar(self.n * len(self.sima_timesteps), "SimA")
            for sl in self._batches():
                z0, cond = self.latents[sl], self._cond(sl)
                for j, t in enumerate(self.sima_timesteps):
                    out[sl, j] = self._eps(z0, t, cond, adapter, "sima").pow(2).flatten(1).mean(1).double().numpy()
                    bar.update(z0.shape[0])
            bar.close()
            return out
        return self._cached(f"sima:{adapter}", compute)

    def pia(self, adapter: bool = True) -> np.ndarray:
        """``(N, len(pia_timesteps))`` PIA distance ``mean |eps(z_t, t) - eps(z0, 0)|^p``."""
        def compute() -> np.ndarray:
            p = self.config.pia_p
            out = np.zeros((self.n, len(self.pia_timesteps)))
            bar = self._bar(self.n * (1 + len(self.pia_timesteps)), "PIA")
            for sl in self._batches():
                z0, cond = self.latents[sl], self._cond(sl)
                e0 = self._eps(z0, 0, cond, adapter, "pia")
                bar.update(z0.shape[0])
                for j, t in enumerate(self.pia_timesteps):
                    d = (self._eps(self._noisy(z0, t, e0), t, cond, adapter, "pia") - e0).abs().pow(p)
                    out[sl, j] = d.flatten(1).mean(1).double().numpy()
                    bar.update(z0.shape[0])
            bar.close()
            return out
        return self._cached(f"pia:{adapter}", compute)

    def secmi(self, adapter: bool = True) -> np.ndarray:
        """``(N,)`` SecMI t-error: deterministic DDIM inversion to ``t_sec - k``, one step up and back."""
        def compute() -> np.ndarray:
            k, t_sec = self.secmi_step, self.secmi_t
            ups = list(range(k, t_sec - k + 1, k))
            out = np.zeros(self.n)
            bar = self._bar(self.n * (len(ups) + 2), "SecMI")
            for sl in self._batches():
                z, cond, s = self.latents[sl], self._cond(sl), 0
                for u in ups:
                    z = self._ddim(z, s, u, self._eps(z, s, cond, adapter, "secmi"))
                    s = u
                    bar.update(z.shape[0])
                z_up = self._ddim(z, s, s + k, self._eps(z, s, cond, adapter, "secmi"))
                z_back = self._ddim(z_up, s + k, s, self._eps(z_up, s + k, cond, adapter, "secmi"))
                bar.update(2 * z.shape[0])
                out[sl] = (z_back - z).pow(2).flatten(1).mean(1).double().numpy()
            bar.close()
            return out
        return self._cached(f"secmi:{adapter}", compute)

    def reduced_captions(self) -> List[List[str]]:
        """``clid_reductions`` reduced versions of every caption; the last one is the null caption.

        Reduction ``i`` (1-based) masks ``round(i / k * words)`` words chosen by a generator seeded
        from the caption text and the audit seed, so a caption is always reduced the same way.
        """
        if self.captions is None:
            raise AuditError("CLiD needs captions; none were given.")
        k = self.config.clid_reductions
        out: List[List[str]] = [[] for _ in range(k)]
        for cap in self.captions:
            words = cap.split()
            seed = zlib.crc32(cap.encode("utf-8")) ^ int(self.config.seed)
            order = np.random.default_rng(seed).permutation(len(words))
            for i in range(1, k):
                drop = set(order[: int(round(i / k * len(words)))].tolist())
                out[i - 1].append(" ".join(w for j, w in enumerate(words) if j not in drop))
            out[k - 1].append("")
        return out

    def clid(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(L_cond (N, P), L_reduced (N, k, P))`` losses at the CLiD (t, noise) pairs.

        The pairs are ``(clid_timesteps[j], noise draw j mod M)``; the conditional and the reduced
        captions reuse exactly the same pairs.
        """
        def compute() -> Tuple[np.ndarray, np.ndarray]:
            reduced = self.reduced_captions()
            pairs = [(t, j % self.config.draws) for j, t in enumerate(self.clid_timesteps)]
            cond_l = np.zeros((self.n, len(pairs)))
            red_l = np.zeros((self.n, len(reduced), len(pairs)))
            bar = self._bar(self.n * len(pairs) * (1 + len(reduced)), "CLiD")
            for sl in self._batches():
                z0 = self.latents[sl]
                conds = [self._cond(sl)] + [self._cond(sl, r) for r in reduced]
                for j, (t, m) in enumerate(pairs):
                    e = self.noise[m].expand_as(z0)
                    zt = self._noisy(z0, t, e)
                    for c_i, c in enumerate(conds):
                        l = (self._eps(zt, t, c, True, "clid") - e).pow(2).flatten(1).mean(1).double().numpy()
                        if c_i == 0:
                            cond_l[sl, j] = l
                        else:
                            red_l[sl, c_i - 1, j] = l
                        bar.update(z0.shape[0])
            bar.close()
            return cond_l, red_l
        return self._cached("clid", compute)

    def pixels(self, max_side: int = 16) -> np.ndarray:
        """Images pooled to at most ``max_side`` per side, flattened: the blind baseline's input."""
        x = self.images.float()
        if x.ndim == 4 and max(x.shape[-2:]) > max_side:
            x = F.adaptive_avg_pool2d(x, (min(max_side, x.shape[-2]), min(max_side, x.shape[-1])))
        return x.flatten(1).double().numpy()
