"""Does a LoRA leak *beyond its baseline*? A paired comparison of two audits of the same samples.

A verdict on its own asks whether members score higher than non-members. With an untouched
model that answer is "no" in truth, yet a draw in which the members happen to be easier images
reads "leaks" at the verdict's false-alarm rate (about 5%). A LoRA audited on that same draw
inherits the same luck. :func:`compare_to_baseline` removes it: both audits scored the same
evaluation samples in the same order (same members, non-members, split and audit seed), so per
attack the difference of their AUCs has a much smaller variance than either AUC.

Statistic (DeLong, DeLong and Clarke-Pearson 1988, for correlated ROC curves): every attack's
AUC on the target and on the baseline, their joint covariance from the per-sample placement
values, and per attack ``z = (AUC_target - AUC_baseline) / se``. Two one-sided tests, as in the
verdict:

* **headline**: the target report's headline attack (chosen on its calibration split);
* **envelope**: the largest ``z`` over attacks (the multiplicity of picking it is paid for).

Null (default, ``n_permutations=1000``): the membership labels permuted, the same permutation for
both models and every attack, within each pooled run. When the members were a random draw, it is
exact for a LoRA that adds nothing to a baseline that never saw them (an untouched base model),
and it stays valid when one image is audited in several pooled runs. With ``n_permutations=0``: the
normal approximation (headline: normal tail; envelope: maximum of correlated normals with the
differences' correlation), which treats samples as independent. ``"leaks beyond the baseline"``
when ``min(p_headline, p_envelope) < alpha / 2``; otherwise ``"no evidence beyond the baseline"``.
Pooled reports (:func:`~.pooled.pool_reports`) compare on their standardised pooled scores.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np

from . import metrics as M
from . import stats as S
from .target import AuditError

BEYOND = "leaks beyond the baseline"
NOT_BEYOND = "no evidence beyond the baseline"


def _midranks(x: np.ndarray) -> np.ndarray:
    """Mid-ranks of each row of ``x`` (K, N)."""
    return np.stack([M._midranks(row) for row in x])


def delong(scores: np.ndarray, labels: np.ndarray):
    """AUCs of the rows of ``scores`` (K, N) with labels (N,) (1 = member) and their (K, K) covariance."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y = np.asarray(labels).astype(bool)
    if s.shape[1] != y.size:
        raise AuditError(f"scores have {s.shape[1]} samples but labels {y.size}.")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise AuditError("a paired comparison needs at least 2 members and 2 non-members.")
    if not np.isfinite(s).all():
        raise AuditError("an attack's scores hold NaN or inf; a paired comparison needs finite scores.")
    rz = _midranks(s)
    v10 = (rz[:, y] - _midranks(s[:, y])) / n  # per member: share of non-members it beats
    v01 = 1.0 - (rz[:, ~y] - _midranks(s[:, ~y])) / m  # per non-member: share of members that beat it
    auc = v10.mean(1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def _upper_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _strata(report: Any) -> Optional[np.ndarray]:
    runs = getattr(report, "runs", None)
    if not runs or any(getattr(r, "eval_labels", None) is None for r in runs):
        return None
    return np.concatenate([np.full(np.asarray(r.eval_labels).size, i) for i, r in enumerate(runs)])


def compare_to_baseline(report: Any, baseline: Any, *, alpha: float = 0.05, n_permutations: int = 1000,
                        n_sim: int = 200_000, seed: int = 0, head: Optional[str] = None) -> Dict[str, Any]:
    """The paired verdict of ``report`` against ``baseline`` (see the module docstring).

    Both are :class:`~.protocol.AuditReport` objects returned in this session (single or pooled)
    that scored the same evaluation samples in the same order. ``head``: the headline attack
    (default: ``report``'s own headline). Attacks that do not use the model, or that score both
    models alike, are left out. ``n_permutations=0``: normal approximation instead of label
    permutations (``n_sim`` draws for the envelope's maximum).
    """
    for name, r in (("report", report), ("baseline", baseline)):
        if getattr(r, "scores", None) is None or getattr(r, "eval_labels", None) is None:
            raise AuditError(f"{name} has no scores: compare reports returned by run_audit / run_audit_pooled "
                             "in this session (report.json does not keep scores).")
    if not 0 < alpha < 1 or n_sim < 1000 or not (n_permutations == 0 or n_permutations >= 1000):
        raise AuditError("alpha must be in (0, 1), n_sim at least 1000 and n_permutations 0 (normal "
                         "approximation) or at least 1000.")
    y = np.asarray(report.eval_labels).astype(int)
    yb = np.asarray(baseline.eval_labels).astype(int)
    if y.shape != yb.shape or not np.array_equal(y, yb):
        raise AuditError("the two reports did not score the same evaluation samples: audit the baseline on the "
                         "same members and non-members, with the same calibration split and audit seed.")
    names = [a for a, sc in report.scores.items()
             if sc.uses_model and a in baseline.scores and baseline.scores[a].uses_model]
    if not names:
        raise AuditError("the two reports share no model-using attack; run the same attacks on both.")
    k = len(names)
    stacked = np.stack([report.scores[a].eval_scores for a in names] + [baseline.scores[a].eval_scores for a in names])
    auc, cov = delong(stacked, y)
    c = np.hstack([np.eye(k), -np.eye(k)])
    diff, dcov = c @ auc, c @ cov @ c.T
    se = np.sqrt(np.clip(np.diag(dcov), 0.0, None))
    keep = se > 1e-12
    per_attack: Dict[str, Dict[str, Any]] = {}
    for i, a in enumerate(names):
        z = float(diff[i] / se[i]) if keep[i] else None
        per_attack[a] = {"auc": float(auc[i]), "baseline_auc": float(auc[k + i]), "difference": float(diff[i]),
                         "se": float(se[i]), "difference_ci95": [float(diff[i] - 1.96 * se[i]),
                                                                 float(diff[i] + 1.96 * se[i])],
                         "z": z, "p_value": None if z is None else _upper_tail(z)}
    tested = [a for i, a in enumerate(names) if keep[i]]
    out: Dict[str, Any] = {"alpha": alpha, "n_member": int(y.sum()), "n_nonmember": int((y == 0).sum()),
                           "per_attack": per_attack, "method": "paired AUC differences on the same samples, "
                           "standardised with DeLong's covariance; headline: the report's headline attack; "
                           "envelope: the largest z over attacks"}
    if not tested:
        out.update(verdict=NOT_BEYOND, headline=None, envelope=None,
                   summary="every attack scores the two models alike: nothing beyond the baseline.")
        return out
    head = head or ((getattr(report, "verdict", None) or {}).get("headline") or {}).get("attack")
    if head not in tested:
        head = max(tested, key=lambda a: report.scores[a].calibration_auc)
    idx = [names.index(a) for a in tested]
    z = diff[idx] / se[idx]
    j, h = int(np.argmax(z)), tested.index(head)
    if n_permutations:
        strata = _strata(report)
        perms = S.permuted_labels(y, n_permutations, seed=seed + 4211, strata=strata)
        z_null = np.stack([(S.auc_matrix(report.scores[a].eval_scores, perms)
                            - S.auc_matrix(baseline.scores[a].eval_scores, perms)) / se[i]
                           for a, i in zip(tested, idx)], 1)
        env_null, p_head = z_null.max(1), S.permutation_pvalue(float(z[h]), z_null[:, h])
        null = f"{n_permutations} label permutations" + (" within runs" if strata is not None else "")
        for a, col in zip(tested, z_null.T):
            per_attack[a]["p_value"] = S.permutation_pvalue(per_attack[a]["z"], col)
    else:
        corr = dcov[np.ix_(idx, idx)] / np.outer(se[idx], se[idx])
        w, v = np.linalg.eigh((corr + corr.T) / 2)
        root = v * np.sqrt(np.clip(w, 0.0, None))
        env_null = (np.random.default_rng(seed).standard_normal((n_sim, len(idx))) @ root.T).max(1)
        p_head, null = per_attack[head]["p_value"], "normal approximation"
    p_env = S.permutation_pvalue(float(z[j]), env_null)
    out["headline"] = {"attack": head, **per_attack[head]}
    out["envelope"] = {"attack": tested[j], "z": float(z[j]), "difference": float(diff[idx[j]]), "p_value": p_env,
                       "null_q95": float(np.quantile(env_null, 0.95))}
    out["p_values"] = {"headline": p_head, "envelope": p_env, "level_each": alpha / 2, "null": null}
    out["verdict"] = BEYOND if min(p_head, p_env) < alpha / 2 else NOT_BEYOND
    out["summary"] = (f"{out['verdict']}: headline {head} AUC {auc[names.index(head)]:.3f} vs "
                      f"{auc[k + names.index(head)]:.3f} (p = {p_head:.3g}); largest difference {tested[j]} "
                      f"{diff[idx[j]]:+.3f} (p = {p_env:.3g}).")
    return out
