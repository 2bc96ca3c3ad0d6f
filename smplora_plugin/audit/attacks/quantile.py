"""Quantile-regression MIA (Bertran et al., NeurIPS 2023; Tang et al., ICML 2024): no reference models.

A regressor fitted on calibration **non-members only** predicts, from features that carry no
membership (the public base model's log loss per timestep and pixel statistics), how low the
adapted model's log loss of a sample would be if it were not a member: a per-sample threshold.
Two heads:

- ``gaussian`` (Tang et al.): ridge regressions of the mean and of the log spread of the log
  loss; score ``(mu(x) - s) / sigma(x)``;
- ``quantile a``: gradient-boosted pinball regression of the ``a``-quantile (Bertran et al.);
  score ``q_a(x) - s``.

High = member. Candidates (statistic x head) are scored out-of-fold on the calibration split
(the regressor of each fold never sees that fold's non-members, nor any member), the best is
chosen there, and the evaluation split is scored by the regressor fitted on all calibration
non-members.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import metrics as M
from ..engine import ScoreContext
from .base import Attack, AttackOutput

QUANTILES: Tuple[float, ...] = (0.05,)
_LOG_ABS_Z = 0.6351814227307391  # -E[log |Z|] for Z ~ N(0, 1): log|r| + this estimates log sigma


def statistics(ctx: ScoreContext) -> Dict[str, np.ndarray]:
    """Target statistics: log loss of the adapted model, averaged over the grid and per timestep."""
    g = ctx.loss_grid(True)
    out = {"log loss": np.log(g.mean((1, 2)) + 1e-20)}
    for k, t in enumerate(ctx.timesteps):
        out[f"log loss t={t}"] = np.log(g[:, k].mean(1) + 1e-20)
    return out


def difficulty_features(ctx: ScoreContext) -> np.ndarray:
    """``(N, F)`` membership-free features: the base model's log loss per timestep, pixel statistics."""
    gb = ctx.loss_grid(False)
    x = ctx.images.double().flatten(2)  # (N, C, P)
    img = ctx.images.double()
    cols = [np.log(gb.mean(2) + 1e-20), np.log(gb.mean((1, 2)) + 1e-20)[:, None],
            x.mean(2).numpy(), x.std(2).numpy()]
    if img.ndim == 4 and img.shape[-1] > 1 and img.shape[-2] > 1:
        tv = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).mean(1) + \
             (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).mean(1)
        cols.append(tv.numpy()[:, None])
    return np.concatenate(cols, 1)


def _gaussian_head(seed: int) -> Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(X, y):
        mean = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(X, y)
        r = np.log(np.abs(y - mean.predict(X)) + 1e-12)
        spread = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(X, r)
        floor = max(float(np.std(y)) * 1e-3, 1e-12)

        def score(Xq, s):
            sigma = np.maximum(np.exp(spread.predict(Xq) + _LOG_ABS_Z), floor)
            return (mean.predict(Xq) - s) / sigma
        return score
    return fit


def _quantile_head(alpha: float, seed: int):
    from sklearn.ensemble import GradientBoostingRegressor

    def fit(X, y):
        model = GradientBoostingRegressor(loss="quantile", alpha=alpha, n_estimators=100, max_depth=2,
                                          learning_rate=0.05, subsample=0.8, random_state=seed).fit(X, y)
        return lambda Xq, s: model.predict(Xq) - s
    return fit


def heads(seed: int, quantiles: Sequence[float] = QUANTILES) -> Dict[str, Callable]:
    """Regression heads by name: ``gaussian`` and ``quantile <a>`` for each ``a``."""
    out: Dict[str, Callable] = {"gaussian": _gaussian_head(seed)}
    for a in quantiles:
        out[f"quantile {a:g}"] = _quantile_head(float(a), seed)
    return out


class QuantileRegressionAttack(Attack):
    """Quantile regression on calibration non-members: per-sample loss threshold from base-model difficulty.

    Options: ``quantiles`` (default :data:`QUANTILES`), ``statistics`` (names from
    :func:`statistics`; default all).
    """

    name = "quantile"
    title = "Quantile regression (non-members only, no reference models)"

    def run(self, ctx, cal_index, cal_labels):
        from sklearn.model_selection import StratifiedKFold

        seed = ctx.config.seed
        X = difficulty_features(ctx)
        stats = statistics(ctx)
        if self.options.get("statistics"):
            stats = {k: stats[k] for k in self.options["statistics"]}
        hs = heads(seed, self.options.get("quantiles", QUANTILES))
        folds = max(2, min(ctx.config.cv_folds, int(np.bincount(cal_labels, minlength=2).min())))
        split = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(cal_index, cal_labels))
        non_cal = cal_index[cal_labels == 0]
        best: Optional[Tuple[float, str, np.ndarray, np.ndarray]] = None
        curves: Dict[str, np.ndarray] = {}
        for s_name, s in stats.items():
            for h_name, fit in hs.items():
                oof = np.zeros(len(cal_index))
                for tr, te in split:
                    fit_idx = cal_index[tr][cal_labels[tr] == 0]  # non-members of the other folds only
                    score = fit(X[fit_idx], s[fit_idx])
                    oof[te] = score(X[cal_index[te]], s[cal_index[te]])
                full = fit(X[non_cal], s[non_cal])(X, s)
                name = f"{s_name} | {h_name}"
                curves[name] = full
                a = M.auc(oof[cal_labels == 1], oof[cal_labels == 0])
                if best is None or abs(a - 0.5) > abs(best[0] - 0.5) + 1e-12:
                    best = (a, name, oof, full)
        a, name, oof, full = best
        sign = 1.0 if a >= 0.5 else -1.0
        scores = sign * full
        scores[cal_index] = sign * oof  # only out-of-fold scores may set the threshold
        return AttackOutput(
            scores=scores, calibration_index=cal_index,
            chosen={"candidate": name, "cv_folds": folds, "features": int(X.shape[1]),
                    "sign": "as expected" if sign > 0 else "flipped (anti-member direction)",
                    "calibration_auc": a if sign > 0 else 1.0 - a},
            curves={"statistic_and_head": curves})


__all__: List[str] = ["QUANTILES", "QuantileRegressionAttack", "difficulty_features", "heads", "statistics"]
