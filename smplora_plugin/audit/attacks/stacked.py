"""Stacked attackers: classifiers fitted on the vector of scalar scores, cross-fitted on calibration."""

from __future__ import annotations

from typing import Dict

import numpy as np

from ..engine import ScoreContext
from .base import CrossFitted
from .clid import clid_losses
from .pia import pia_statistic
from .secmi import secmi_statistic
from .sima import sima_statistic


def scalar_features(ctx: ScoreContext) -> Dict[str, np.ndarray]:
    """The vector of scalar scores for the stacked attackers: name -> ``(N,)``.

    SimA, PIA, SecMI and CLiD use the config's option sets (``AuditConfig.attack_options``).
    """
    g, gb = ctx.loss_grid(True), ctx.loss_grid(False)
    feats: Dict[str, np.ndarray] = {"loss": g.mean((1, 2)), "loss_calibrated": (g - gb).mean((1, 2))}
    for k, t in enumerate(ctx.timesteps):
        feats[f"loss t={t}"] = g[:, k].mean(1)
        feats[f"calibrated t={t}"] = (g - gb)[:, k].mean(1)
    cfg = ctx.config
    sima = sima_statistic(ctx)
    for j, t in enumerate(cfg.options("sima").schedule(ctx.T)):
        feats[f"sima t={t}"] = sima[:, j]
    pia = pia_statistic(ctx)
    for j, t in enumerate(cfg.options("pia").schedule(ctx.T)):
        feats[f"pia t={t}"] = np.log(pia[:, j] + 1e-20)
    secmi = secmi_statistic(ctx)
    for j, t in enumerate(cfg.options("secmi").path(ctx.T)[0]):
        feats[f"secmi t_sec={t}"] = np.log(secmi[:, j] + 1e-20)
    if ctx.captions is not None:
        cond, red = clid_losses(ctx)
        for i in range(red.shape[1]):
            feats[f"clid D{i + 1}"] = (red[:, i] - cond).mean(1)
    return feats


class LogRegAttack(CrossFitted):
    """Logistic regression on the standardised vector of scalar scores (loss, calibrated, SimA, PIA, SecMI, CLiD)."""

    name = "logreg"
    title = "Logistic regression on scalar scores"

    def features(self, ctx):
        return np.stack(list(scalar_features(ctx).values()), 1)

    def make_model(self, seed):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


class GradientBoostingAttack(LogRegAttack):
    """Gradient-boosted trees on the vector of scalar scores."""

    name = "gboost"
    title = "Gradient boosting on scalar scores"

    def make_model(self, seed):
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                          random_state=seed)
