"""CLiD (Zhai et al., NeurIPS 2024): the loss gap between the full and importance-reduced captions."""

from __future__ import annotations

import numpy as np

from .base import Attack, _pick
from .stacked import _CrossFitted


def _robust(v: np.ndarray, cal_index: np.ndarray) -> np.ndarray:
    med = np.median(v[cal_index])
    iqr = np.subtract(*np.percentile(v[cal_index], [75, 25])) or 1.0
    return (v - med) / iqr


def clid_features(ctx) -> np.ndarray:
    """``(N, 1 + R)``: the conditional loss ``L_cond`` and the gaps ``D_i = L_reduced_i - L_cond``,
    each averaged over the CLiD (t, noise) pairs."""
    cond, red = ctx.clid()
    return np.concatenate([cond.mean(1)[:, None], (red - cond[:, None, :]).mean(2)], 1)


class CLiDAttack(Attack):
    """CLiD_th: robust-scaled mix ``alpha * gap + (1 - alpha) * (-L_cond)``.

    The gap is the mean of ``D_1..D_R`` (importance-reduced captions and the null caption);
    ``alpha`` (11 values, 0..1) and the robust scalers (median / IQR) are fitted on the
    calibration split.
    """

    name = "clid"
    title = "CLiD_th (importance-reduced caption gap)"
    needs_captions = True

    def run(self, ctx, cal_index, cal_labels):
        f = clid_features(ctx)
        sg, sl = _robust(f[:, 1:].mean(1), cal_index), _robust(-f[:, 0], cal_index)
        cands = {f"alpha={a:g}": a * sg + (1 - a) * sl for a in ctx.config.clid_alphas}
        out = _pick(cands, cal_index, cal_labels)
        out.curves = {"reductions": {f"D{i}": f[:, i] for i in range(1, f.shape[1])}}
        return out


class CLiDVecAttack(_CrossFitted):
    """CLiD_vec: gradient-boosted trees on ``[L_cond, D_1..D_R]``, cross-fitted on calibration."""

    name = "clid_vec"
    title = "CLiD_vec (boosted trees on [L_cond, D1..D4])"
    needs_captions = True

    def features(self, ctx):
        return clid_features(ctx)

    def make_model(self, seed):
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                          random_state=seed)
