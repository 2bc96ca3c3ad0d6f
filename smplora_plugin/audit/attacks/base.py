"""The attack interface: :class:`Attack`, :class:`AttackOutput`, :class:`CrossFitted` and calibration-only helpers.

An attack turns the shared operations and cached quantities of a
:class:`~smplora_plugin.audit.engine.ScoreContext` into one score per sample, higher = more likely
a member. Threshold attacks return named *candidates* (e.g. one per timestep); the protocol picks
the candidate and the sign on the calibration split only. Trained attacks override
:meth:`Attack.run` and fit on the calibration split, returning held-out calibration scores for the
threshold. An attack with settings names its registered option set (``option_set``, see
:func:`~smplora_plugin.audit.config.register_options`) and reads them with :meth:`Attack.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

import numpy as np

from .. import metrics as M
from ..config import make_options
from ..engine import ScoreContext
from ..target import AuditError


@dataclass
class AttackOutput:
    """Scores of one attack for all ``N`` samples, oriented so that higher = member.

    ``calibration_index``: the calibration samples whose scores were not fitted on and may fix
    the threshold. ``chosen``: what was tuned on the calibration split (candidate, sign, epoch,
    ...). ``curves``: optional named families of candidates (e.g. per-timestep) for diagnostics.
    """

    scores: np.ndarray
    calibration_index: np.ndarray
    chosen: Dict[str, Any] = field(default_factory=dict)
    curves: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)


class Attack:
    """Base class. Subclasses set ``name``/``title`` and implement :meth:`candidates` or :meth:`run`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_captions: ClassVar[bool] = False
    uses_model: ClassVar[bool] = True  # False only for the blind baseline
    option_set: ClassVar[str] = ""  # the registered options this attack reads ("" = free-form options)

    def __init__(self, **options: Any):
        if self.option_set:  # refuse unknown or bad options now, not after model work
            make_options(self.option_set, options)
        self.options = options

    def settings(self, ctx: ScoreContext) -> Any:
        """The attack's options: defaults, then the config's ``attack_options``, then this instance's."""
        return ctx.config.options(self.option_set, **self.options)

    def candidates(self, ctx: ScoreContext) -> Dict[str, np.ndarray]:
        """Named candidate scores ``(N,)``, oriented by the attack's prior (higher = member)."""
        raise NotImplementedError

    def curves(self, ctx: ScoreContext) -> Dict[str, Dict[str, np.ndarray]]:
        """Optional diagnostic families of scores (name -> {label: scores})."""
        return {}

    def run(self, ctx: ScoreContext, cal_index: np.ndarray, cal_labels: np.ndarray) -> AttackOutput:
        """Pick the candidate and sign with the largest two-sided AUC on the calibration split."""
        cands = self.candidates(ctx)
        if not cands:
            raise AuditError(f"attack {self.name!r} produced no scores.")
        best_name, best_auc = None, None
        for name, s in cands.items():
            a = M.auc(s[cal_index][cal_labels == 1], s[cal_index][cal_labels == 0])
            if best_auc is None or abs(a - 0.5) > abs(best_auc - 0.5) + 1e-12:
                best_name, best_auc = name, a
        sign = 1.0 if best_auc >= 0.5 else -1.0
        chosen = {"sign": "as expected" if sign > 0 else "flipped (anti-member direction)",
                  "calibration_auc": best_auc if sign > 0 else 1.0 - best_auc}
        if len(cands) > 1:
            chosen["candidate"] = best_name
        return AttackOutput(scores=sign * cands[best_name], calibration_index=cal_index, chosen=chosen,
                            curves=self.curves(ctx))


class CrossFitted(Attack):
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


def _pick(cands: Dict[str, np.ndarray], cal_index: np.ndarray, cal_labels: np.ndarray) -> AttackOutput:
    class _Tmp(Attack):
        name = "tmp"

        def candidates(self, ctx):
            return cands

    return _Tmp().run(None, cal_index, cal_labels)  # type: ignore[arg-type]


def _stratified_split(index: np.ndarray, labels: np.ndarray, frac: float, seed: int):
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in (0, 1):
        idx = index[labels == c]
        idx = idx[rng.permutation(idx.size)]
        k = int(round(frac * idx.size))
        k = min(max(k, 1), idx.size - 1) if idx.size >= 2 else idx.size
        fit.append(idx[:k])
        val.append(idx[k:])
    fit_idx, val_idx = np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))
    if min(np.isin(val_idx, index[labels == 1]).sum(), np.isin(val_idx, index[labels == 0]).sum()) < 1:
        raise AuditError("the MLP attack needs at least 2 members and 2 non-members in the calibration split.")
    return fit_idx, val_idx
