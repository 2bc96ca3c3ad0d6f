"""CLiD (Zhai et al., NeurIPS 2024): the loss gap between the full and importance-reduced captions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..config import register_options
from ..engine import ScoreContext, scale_timesteps
from ..target import AuditError
from .base import Attack, CrossFitted, _pick


@register_options("clid", legacy_prefix="clid_")
@dataclass
class CLiDOptions:
    """``timesteps`` (for T = 1000; pair ``j`` uses noise draw ``j mod M``), ``fractions``: shares of
    the words removed, most important first; ``max_words``: only the first words are ranked (and
    removable), one pass per ranked word; ``alphas``: the mix weights of CLiD_th."""

    timesteps: Tuple[int, ...] = (440, 450, 460)
    fractions: Tuple[float, ...] = (0.3, 0.5, 0.7)
    max_words: int = 16
    alphas: Tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def validate(self) -> None:
        if not self.timesteps:
            raise AuditError("clid_timesteps must list at least one timestep.")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise AuditError("clid_fractions must be shares in (0, 1), e.g. [0.3, 0.5, 0.7].")
        if self.max_words < 1:
            raise AuditError("clid_max_words must be >= 1 (default 16).")
        if not self.alphas or not all(0 <= a <= 1 for a in self.alphas):
            raise AuditError("clid_alphas must be mix weights in [0, 1], e.g. [0, 0.1, ..., 1].")

    def schedule(self, T: int) -> List[int]:
        return scale_timesteps(self.timesteps, T)


def clid_losses(ctx: ScoreContext, options: Optional[CLiDOptions] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(L_cond (N, P), L_reduced (N, R, P))`` losses of the adapted model at the CLiD (t, noise) pairs.

    The pairs are ``(schedule[j], noise draw j mod M)``; every caption variant reuses exactly the
    same pairs. Reduction ``i < R - 1`` removes the share ``fractions[i]`` of the caption's words
    (at least one), most important first; the last one is the null caption. A word's importance is
    the conditional loss increase when it alone is left out, measured with the adapted model on
    the sample itself at the middle pair; only the first ``max_words`` words are ranked (and can
    be removed).
    """
    if ctx.captions is None:
        raise AuditError("CLiD needs captions; none were given.")
    opts = options or ctx.config.options("clid")
    pairs = [(t, j % ctx.config.draws) for j, t in enumerate(opts.schedule(ctx.T))]

    def compute() -> Tuple[np.ndarray, np.ndarray]:
        r = len(pairs) // 2  # the ranking pair
        cond_l = np.zeros((ctx.n, len(pairs)))
        red_l = np.zeros((ctx.n, len(opts.fractions) + 1, len(pairs)))
        bar = ctx.bar(ctx.n * len(pairs) * (2 + len(opts.fractions)), "CLiD")
        for sl in ctx.batches():
            z0, caps = ctx.latents[sl], list(ctx.captions[sl])
            noisy = []
            for j, (t, m) in enumerate(pairs):
                e = ctx.noise[m].expand_as(z0)
                noisy.append((ctx.noisy(z0, t, e), e))
                cond_l[sl, j] = _loss(ctx, noisy[j][0], noisy[j][1], t, caps)
                bar.update(z0.shape[0])
            imp = _word_importance(ctx, caps, noisy[r][0], noisy[r][1], pairs[r][0], cond_l[sl, r], opts.max_words)
            reduced = [[reduce_caption(c, imp[i], f) for i, c in enumerate(caps)] for f in opts.fractions]
            for i, red in enumerate(reduced + [[""] * len(caps)]):
                for j, (t, _) in enumerate(pairs):
                    red_l[sl, i, j] = _loss(ctx, noisy[j][0], noisy[j][1], t, red)
                    bar.update(z0.shape[0])
        bar.close()
        return cond_l, red_l
    return ctx.cached(f"clid:{opts!r}", compute)


def _loss(ctx: ScoreContext, zt: torch.Tensor, e: torch.Tensor, t: int, captions: List[str]) -> np.ndarray:
    out = ctx.eps(zt, t, ctx.target.condition(list(captions)), True, "clid")
    return (out - e).pow(2).flatten(1).mean(1).double().numpy()


def _word_importance(ctx: ScoreContext, caps: List[str], zt: torch.Tensor, e: torch.Tensor, t: int,
                     full: np.ndarray, max_words: int) -> np.ndarray:
    """``(B, max_words)`` loss increase when word ``w`` alone is left out (``-inf``: no such word).

    Batched by word position: one pass per sample per ranked word.
    """
    words = [c.split() for c in caps]
    imp = np.full((len(caps), max_words), -np.inf)
    for w in range(min(max_words, max((len(x) for x in words), default=0))):
        rows = [i for i, x in enumerate(words) if len(x) > w]
        loo = [" ".join(words[i][:w] + words[i][w + 1:]) for i in rows]
        idx = torch.as_tensor(rows)
        imp[rows, w] = _loss(ctx, zt[idx], e[idx], t, loo) - full[rows]
    return imp


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


def _robust(v: np.ndarray, cal_index: np.ndarray) -> np.ndarray:
    med = np.median(v[cal_index])
    iqr = np.subtract(*np.percentile(v[cal_index], [75, 25])) or 1.0
    return (v - med) / iqr


def clid_features(ctx: ScoreContext, options: Optional[CLiDOptions] = None) -> np.ndarray:
    """``(N, 1 + R)``: the conditional loss ``L_cond`` and the gaps ``D_i = L_reduced_i - L_cond``,
    each averaged over the CLiD (t, noise) pairs."""
    cond, red = clid_losses(ctx, options)
    return np.concatenate([cond.mean(1)[:, None], (red - cond[:, None, :]).mean(2)], 1)


class CLiDAttack(Attack):
    """CLiD_th: robust-scaled mix ``alpha * gap + (1 - alpha) * (-L_cond)``.

    The gap is the mean of ``D_1..D_R`` (importance-reduced captions and the null caption);
    ``alpha`` (11 values, 0..1) and the robust scalers (median / IQR) are fitted on the
    calibration split. Options: :class:`CLiDOptions`.
    """

    name = "clid"
    title = "CLiD_th (importance-reduced caption gap)"
    needs_captions = True
    option_set = "clid"

    def run(self, ctx, cal_index, cal_labels):
        opts = self.settings(ctx)
        f = clid_features(ctx, opts)
        sg, sl = _robust(f[:, 1:].mean(1), cal_index), _robust(-f[:, 0], cal_index)
        cands = {f"alpha={a:g}": a * sg + (1 - a) * sl for a in opts.alphas}
        out = _pick(cands, cal_index, cal_labels)
        out.curves = {"reductions": {f"D{i}": f[:, i] for i in range(1, f.shape[1])}}
        return out


class CLiDVecAttack(CrossFitted):
    """CLiD_vec: gradient-boosted trees on ``[L_cond, D_1..D_R]``, cross-fitted on calibration.
    Options: :class:`CLiDOptions` (the statistic's; ``alphas`` is unused)."""

    name = "clid_vec"
    title = "CLiD_vec (boosted trees on [L_cond, D1..D4])"
    needs_captions = True
    option_set = "clid"

    def features(self, ctx):
        return clid_features(ctx, self.settings(ctx))

    def make_model(self, seed):
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                          random_state=seed)
