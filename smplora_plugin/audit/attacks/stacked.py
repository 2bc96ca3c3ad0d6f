"""Stacked attackers: classifiers fitted on the vector of scalar scores, cross-fitted on calibration."""

from __future__ import annotations

from typing import Dict

import numpy as np

from .. import metrics as M
from ..engine import ScoreContext
from .base import Attack, AttackOutput


def scalar_features(ctx: ScoreContext) -> Dict[str, np.ndarray]:
    """The vector of scalar scores for the stacked attackers: name -> ``(N,)``."""
    g, gb = ctx.loss_grid(True), ctx.loss_grid(False)
    feats: Dict[str, np.ndarray] = {"loss": g.mean((1, 2)), "loss_calibrated": (g - gb).mean((1, 2))}
    for k, t in enumerate(ctx.timesteps):
        feats[f"loss t={t}"] = g[:, k].mean(1)
        feats[f"calibrated t={t}"] = (g - gb)[:, k].mean(1)
    for j, t in enumerate(ctx.sima_timesteps):
        feats[f"sima t={t}"] = ctx.sima(True)[:, j]
    for j, t in enumerate(ctx.pia_timesteps):
        feats[f"pia t={t}"] = np.log(ctx.pia(True)[:, j] + 1e-20)
    for j, t in enumerate(ctx.secmi_t):
        feats[f"secmi t_sec={t}"] = np.log(ctx.secmi(True)[:, j] + 1e-20)
    if ctx.captions is not None:
        cond, red = ctx.clid()
        for i in range(red.shape[1]):
            feats[f"clid D{i + 1}"] = (red[:, i] - cond).mean(1)
    return feats


class _CrossFitted(Attack):
    """Fit a scikit-learn classifier on the calibration split with out-of-fold calibration scores."""

    def features(self, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError

    def make_model(self, seed: int):
        raise NotImplementedError

    def run(self, ctx, cal_index, cal_labels):
        from sklearn.model_selection import StratifiedKFold

        X = self.features(ctx)
        folds = max(2, min(ctx.config.cv_folds, int(np.bincount(cal_labels, minlength=2).min())))
        oof = np.zeros(len(cal_index))
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=ctx.config.seed)
        for tr, te in skf.split(X[cal_index], cal_labels):
            model = self.make_model(ctx.config.seed).fit(X[cal_index[tr]], cal_labels[tr])
            oof[te] = _member_score(model, X[cal_index[te]])
        model = self.make_model(ctx.config.seed).fit(X[cal_index], cal_labels)
        scores = _member_score(model, X)
        scores[cal_index] = oof  # only out-of-fold scores may set the threshold
        a = M.auc(oof[cal_labels == 1], oof[cal_labels == 0])
        return AttackOutput(scores=scores, calibration_index=cal_index,
                            chosen={"cv_folds": folds, "features": int(X.shape[1]), "calibration_auc": a})


def _member_score(model, X: np.ndarray) -> np.ndarray:
    p = model.predict_proba(X)[:, 1]
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class LogRegAttack(_CrossFitted):
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
