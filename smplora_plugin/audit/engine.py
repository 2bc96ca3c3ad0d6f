"""Shared, cached model queries for all attacks, with common random numbers.

:class:`ScoreContext` holds the latents of every audited sample (calibration and evaluation,
members and non-members) and computes each model quantity once for all of them: the loss grid
(timesteps x noise draws) with and without the adapter, SimA norms, PIA and SecMI scores and the
CLiD reduced-caption losses. Every sample sees the very same ``(t, noise)`` draws, and so does
the base model (common random numbers); the draws come from a seeded generator.
"""

from __future__ import annotations

import math
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
    sima_timesteps: Tuple[int, ...] = tuple(range(0, 200, 10))  # SimA's official grid, t = 0 included
    sima_p: float = 4.0
    pia_timesteps: Tuple[int, ...] = tuple(range(10, 501, 10))
    pia_p: float = 4.0
    secmi_t: Tuple[int, ...] = (100, 150, 200)  # t_sec candidates, one shared DDIM inversion path
    secmi_step: int = 10
    clid_timesteps: Tuple[int, ...] = (440, 450, 460)
    clid_fractions: Tuple[float, ...] = (0.3, 0.5, 0.7)  # share of the words removed, most important first
    clid_max_words: int = 16  # only the first words are ranked (and removable); cost is 1 pass per ranked word
    clid_alphas: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    flip_average: bool = False  # average every model quantity over the image and its horizontal mirror
    near_duplicate_mse: float = 1e-3  # across-set image pairs closer than this (pooled pixels) are warned about
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

    def __post_init__(self) -> None:
        if isinstance(self.secmi_t, (int, float)):  # a single t_sec, as in earlier versions
            self.secmi_t = (int(self.secmi_t),)

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
        if self.secmi_step < 1 or not self.secmi_t or min(self.secmi_t) <= self.secmi_step:
            raise AuditError("every secmi_t candidate must be larger than secmi_step >= 1 "
                             "(defaults: [100, 150, 200] and 10).")
        if not self.sima_timesteps or not self.pia_timesteps or not self.clid_timesteps:
            raise AuditError("sima_timesteps, pia_timesteps and clid_timesteps must each list at least one timestep.")
        if self.sima_p <= 0 or self.pia_p <= 0:
            raise AuditError("sima_p and pia_p must be > 0 (the official setting is 4).")
        if not self.clid_fractions or not all(0 < f < 1 for f in self.clid_fractions):
            raise AuditError("clid_fractions must be shares in (0, 1), e.g. [0.3, 0.5, 0.7].")
        if self.near_duplicate_mse < 0:
            raise AuditError("near_duplicate_mse must be >= 0 (0 turns the near-duplicate warning off).")
        if self.clid_max_words < 1:
            raise AuditError("clid_max_words must be >= 1 (default 16).")
        if not self.clid_alphas or not all(0 <= a <= 1 for a in self.clid_alphas):
            raise AuditError("clid_alphas must be mix weights in [0, 1], e.g. [0, 0.1, ..., 1].")
        if not 0 < self.mlp_fit_fraction < 1:
            raise AuditError("mlp_fit_fraction must be in (0, 1).")


def _scale_t(ts: Sequence[int], T: int) -> List[int]:
    out = sorted({min(T - 1, max(0, int(round(t * T / 1000.0)))) for t in ts})
    return out


class ScoreContext:
    """Latents, captions and cached model quantities for ``N`` samples (index order is fixed).

    With ``config.flip_average`` every model quantity is the mean of its values on the image and
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
        self.timesteps = _scale_t(config.timesteps, self.T)
        self.sima_timesteps = _scale_t(config.sima_timesteps, self.T)
        self.pia_timesteps = [t for t in _scale_t(config.pia_timesteps, self.T) if t > 0]
        self.clid_timesteps = _scale_t(config.clid_timesteps, self.T)
        self.secmi_step = max(1, int(round(config.secmi_step * self.T / 1000.0)))
        k = self.secmi_step
        self.secmi_t = sorted({min((self.T - 1) // k * k, k * max(1, int(round(t * self.T / 1000.0 / k))))
                               for t in config.secmi_t})
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

    # -- plumbing -------------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        from .progress import progress_bar

        return progress_bar(total=total, desc=desc, enabled=self.progress)

    def _batches(self) -> List[slice]:
        b = self.config.batch_size
        return [slice(i, min(i + b, self.n)) for i in range(0, self.n, b)]

    def _encode(self, images: torch.Tensor, desc: str = "encode") -> torch.Tensor:
        """Latents in float32, or float64 when the target encodes to float64 (exact known-answer targets)."""
        out = []
        bar = self._bar(images.shape[0], desc)
        for i in range(0, images.shape[0], self.config.batch_size):
            x = images[i:i + self.config.batch_size]
            z = torch.as_tensor(self.target.encode(x)).cpu()
            out.append(z.double() if z.dtype == torch.float64 else z.float())
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
        out = torch.as_tensor(self.target.eps(z, tt, cond, adapter=adapter)).cpu().to(z.dtype)
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
        """``fn()`` once; with flip averaging, the mean of ``fn()`` on the image and on its mirror."""
        if key not in self._cache:
            vals = [self._in_view(v, fn) for v in range(len(self._views))]
            self._cache[key] = vals[0] if len(vals) == 1 else _mean_views(vals)
        return self._cache[key]

    def _in_view(self, view: int, fn: Callable[[], Any]) -> Any:
        current = self.latents
        self.latents = self._views[view]
        try:
            return fn()
        finally:
            self.latents = current

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
        """``(N, len(sima_timesteps))`` SimA statistic ``sum |eps(z0, t)|^p`` over the latent's elements."""
        def compute() -> np.ndarray:
            p = self.config.sima_p
            out = np.zeros((self.n, len(self.sima_timesteps)))
            bar = self._bar(self.n * len(self.sima_timesteps), "SimA")
            for sl in self._batches():
                z0, cond = self.latents[sl], self._cond(sl)
                for j, t in enumerate(self.sima_timesteps):
                    e = self._eps(z0, t, cond, adapter, "sima")
                    out[sl, j] = e.abs().pow(p).flatten(1).sum(1).double().numpy()
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
        """``(N, len(secmi_t))`` SecMI t-error for each ``t_sec`` candidate.

        One deterministic DDIM inversion path ``0 -> k -> 2k -> ...`` up to the largest ``t_sec``
        serves every candidate: for ``t_sec`` the path point at ``t_sec - k`` is stepped up to
        ``t_sec`` (that is the path's own next step) and denoised back with ``eps(z_{t_sec}, t_sec)``
        (the model call the path needs for its following step), so all candidates together cost
        ``max(t_sec) / k + 1`` passes.
        """
        def compute() -> np.ndarray:
            k, cands = self.secmi_step, self.secmi_t
            top = cands[-1]
            out = np.zeros((self.n, len(cands)))
            bar = self._bar(self.n * (top // k + 1), "SecMI")
            for sl in self._batches():
                z, cond = self.latents[sl], self._cond(sl)
                prev = z
                for s in range(0, top + 1, k):
                    e = self._eps(z, s, cond, adapter, "secmi")
                    bar.update(z.shape[0])
                    if s in cands:
                        back = self._ddim(z, s, s - k, e)
                        out[sl, cands.index(s)] = (back - prev).pow(2).flatten(1).mean(1).double().numpy()
                    if s < top:
                        prev, z = z, self._ddim(z, s, s + k, e)
            bar.close()
            return out
        return self._cached(f"secmi:{adapter}", compute)

    def clid(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(L_cond (N, P), L_reduced (N, R, P))`` losses at the CLiD (t, noise) pairs.

        The pairs are ``(clid_timesteps[j], noise draw j mod M)``; every caption variant reuses
        exactly the same pairs. Reduction ``i < R - 1`` removes the share ``clid_fractions[i]``
        of the caption's words (at least one), most important first; the last one is the null
        caption. A word's importance is the conditional loss increase when it alone is left out,
        measured with the adapted model on the sample itself at the middle pair; only the first
        ``clid_max_words`` words are ranked (and can be removed).
        """
        if self.captions is None:
            raise AuditError("CLiD needs captions; none were given.")

        def compute() -> Tuple[np.ndarray, np.ndarray]:
            fracs = self.config.clid_fractions
            pairs = [(t, j % self.config.draws) for j, t in enumerate(self.clid_timesteps)]
            r = len(pairs) // 2  # the ranking pair
            cond_l = np.zeros((self.n, len(pairs)))
            red_l = np.zeros((self.n, len(fracs) + 1, len(pairs)))
            bar = self._bar(self.n * len(pairs) * (2 + len(fracs)), "CLiD")
            for sl in self._batches():
                z0, caps = self.latents[sl], list(self.captions[sl])
                noisy = []
                for j, (t, m) in enumerate(pairs):
                    e = self.noise[m].expand_as(z0)
                    noisy.append((self._noisy(z0, t, e), e))
                    cond_l[sl, j] = self._loss(noisy[j][0], noisy[j][1], t, caps)
                    bar.update(z0.shape[0])
                imp = self._word_importance(caps, noisy[r][0], noisy[r][1], pairs[r][0], cond_l[sl, r])
                reduced = [[reduce_caption(c, imp[i], f) for i, c in enumerate(caps)] for f in fracs]
                for i, red in enumerate(reduced + [[""] * len(caps)]):
                    for j, (t, _) in enumerate(pairs):
                        red_l[sl, i, j] = self._loss(noisy[j][0], noisy[j][1], t, red)
                        bar.update(z0.shape[0])
            bar.close()
            return cond_l, red_l
        return self._cached("clid", compute)

    def _loss(self, zt: torch.Tensor, e: torch.Tensor, t: int, captions: List[str], what: str = "clid") -> np.ndarray:
        out = self._eps(zt, t, self.target.condition(list(captions)), True, what)
        return (out - e).pow(2).flatten(1).mean(1).double().numpy()

    def _word_importance(self, caps: List[str], zt: torch.Tensor, e: torch.Tensor, t: int,
                         full: np.ndarray) -> np.ndarray:
        """``(B, clid_max_words)`` loss increase when word ``w`` alone is left out (``-inf``: no such word).

        Batched by word position: one pass per sample per ranked word.
        """
        words = [c.split() for c in caps]
        W = self.config.clid_max_words
        imp = np.full((len(caps), W), -np.inf)
        for w in range(min(W, max((len(x) for x in words), default=0))):
            rows = [i for i, x in enumerate(words) if len(x) > w]
            loo = [" ".join(words[i][:w] + words[i][w + 1:]) for i in rows]
            idx = torch.as_tensor(rows)
            imp[rows, w] = self._loss(zt[idx], e[idx], t, loo) - full[rows]
        return imp

    def pixels(self, max_side: int = 16) -> np.ndarray:
        """Images pooled to at most ``max_side`` per side, flattened: the blind baseline's input."""
        x = self.images.float()
        if x.ndim == 4 and max(x.shape[-2:]) > max_side:
            x = F.adaptive_avg_pool2d(x, (min(max_side, x.shape[-2]), min(max_side, x.shape[-1])))
        return x.flatten(1).double().numpy()


def reduce_caption(caption: str, importance: np.ndarray, fraction: float) -> str:
    """``caption`` without its ``max(1, round(fraction * words))`` most important words (half up).

    ``importance[w]`` scores word ``w`` (``-inf`` or absent: not ranked, never removed); ties go
    to the earlier word. The removable words are capped at the ranked ones.
    """
    words = caption.split()
    ranked = [w for w in range(min(len(words), len(importance))) if np.isfinite(importance[w])]
    k = min(len(ranked), max(1, int(math.floor(fraction * len(words) + 0.5))))  # half rounds up
    order = sorted(ranked, key=lambda w: (-float(importance[w]), w))
    drop = set(order[:k])
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def _mean_views(vals: List[Any]) -> Any:
    """Element-wise mean of per-view results (arrays, or tuples of arrays / None)."""
    if isinstance(vals[0], tuple):
        return tuple(None if parts[0] is None else _mean_views(list(parts)) for parts in zip(*vals))
    return sum(vals) / len(vals)
