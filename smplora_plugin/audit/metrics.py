"""Membership-inference metrics on score arrays (higher score = more likely a member).

Everything here is plain numpy so that it can be checked against scikit-learn. Conventions:

* ``roc_curve`` returns one point per distinct threshold, like ``sklearn.metrics.roc_curve`` with
  ``drop_intermediate=False`` (a sample is predicted "member" when ``score >= threshold``).
* ``tpr_at_fpr`` is conservative: the largest TPR among ROC points whose FPR is ``<= target``; no
  interpolation. It is ``None`` ("n/a") when there are fewer than ``ceil(1 / target)``
  non-members, because the FPR cannot then be resolved at that level.
* The AUC confidence interval is a percentile bootstrap that resamples members and non-members
  separately (stratified), with a seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import SmploraError


class MetricError(SmploraError):
    """Scores cannot support the requested metric (too few samples, non-finite values, ...)."""


def _check(member: np.ndarray, nonmember: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise MetricError(
            f"need at least one member and one non-member score, got {m.size} members and {n.size} non-members."
        )
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise MetricError("scores contain NaN or infinity; check the model outputs (e.g. fp16 overflow).")
    return m, n


def roc_curve(member: Sequence[float], nonmember: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, starting at ``(0, 0, +inf)``; member = ``score >= threshold``."""
    m, n = _check(member, nonmember)
    scores = np.concatenate([m, n])
    labels = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # last index of each distinct score
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / m.size]
    fpr = np.r_[0.0, fp / n.size]
    thr = np.r_[np.inf, scores[last]]
    return fpr, tpr, thr


def auc(member: Sequence[float], nonmember: Sequence[float]) -> float:
    """Area under the ROC curve = P(member score > non-member score) + 0.5 P(tie)."""
    m, n = _check(member, nonmember)
    # Mann-Whitney U with mid-ranks for ties
    scores = np.concatenate([m, n])
    ranks = _midranks(scores)
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.r_[0, np.nonzero(np.diff(xs))[0] + 1]
    ends = np.r_[starts[1:], x.size]
    # every member of a tie group [s, e) gets the mean of the 1-based ranks s+1..e
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc_bootstrap_ci(member: Sequence[float], nonmember: Sequence[float], *, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap CI of the AUC, members and non-members resampled separately."""
    m, n = _check(member, nonmember)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        vals[b] = _auc_fast(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _auc_fast(m: np.ndarray, n: np.ndarray) -> float:
    # P(m > n) + 0.5 P(m == n) via sorted search; O((M + N) log N)
    ns = np.sort(n)
    below = np.searchsorted(ns, m, side="left")
    below_eq = np.searchsorted(ns, m, side="right")
    return float((below.sum() + 0.5 * (below_eq - below).sum()) / (m.size * n.size))


def null_band(n_member: int, n_nonmember: int, level: float = 0.95) -> Tuple[float, float]:
    """Band around 0.5 that a chance-level AUC falls in (normal approx. of the Mann-Whitney U)."""
    se = math.sqrt((n_member + n_nonmember + 1) / (12.0 * n_member * n_nonmember))
    z = _z(level)
    return 0.5 - z * se, 0.5 + z * se


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def tpr_at_fpr(member: Sequence[float], nonmember: Sequence[float], target: float) -> Optional[float]:
    """Largest TPR with FPR <= ``target`` (conservative); ``None`` if too few non-members."""
    m, n = _check(member, nonmember)
    if n.size < math.ceil(1.0 / target - 1e-9):
        return None
    fpr, tpr, _ = roc_curve(m, n)
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def balanced_accuracy(member: Sequence[float], nonmember: Sequence[float], threshold: float) -> float:
    """Mean of TPR and TNR when ``score >= threshold`` predicts "member"."""
    m, n = _check(member, nonmember)
    return float(0.5 * ((m >= threshold).mean() + (n < threshold).mean()))


def best_threshold(member: Sequence[float], nonmember: Sequence[float]) -> Tuple[float, float]:
    """``(threshold, balanced accuracy)`` maximising balanced accuracy on these scores.

    The threshold is the midpoint between the chosen score and the next lower distinct score,
    so it generalises symmetrically to unseen scores.
    """
    m, n = _check(member, nonmember)
    fpr, tpr, thr = roc_curve(m, n)
    bacc = 0.5 * (tpr + 1 - fpr)
    i = int(np.argmax(bacc))
    if i == 0:  # predicting nobody a member is best: put the threshold above every score
        return float(np.max(np.r_[m, n]) + 1.0), float(bacc[0])
    lower = thr[i + 1] if i + 1 < thr.size else thr[i] - 1.0
    return float(0.5 * (thr[i] + lower)), float(bacc[i])


@dataclass
class MetricSet:
    """All per-attack metrics on the evaluation split (see :func:`evaluate`)."""

    auc: float
    auc_ci: Tuple[float, float]
    leakage: float
    tpr_at_1pct_fpr: Optional[float]
    tpr_at_0_1pct_fpr: Optional[float]
    balanced_accuracy: Optional[float]
    threshold: Optional[float]
    paper_tpr_at_5pct_fpr: Optional[float]
    paper_asr: float
    paper_aucn: float
    n_member: int
    n_nonmember: int

    def to_dict(self) -> Dict[str, object]:
        return {
            "auc": self.auc,
            "auc_ci95": list(self.auc_ci),
            "leakage": self.leakage,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_0.1pct_fpr": self.tpr_at_0_1pct_fpr,
            "balanced_accuracy": self.balanced_accuracy,
            "threshold": self.threshold,
            "paper_comparison": {
                "tpr_at_5pct_fpr": self.paper_tpr_at_5pct_fpr,
                "asr_best_threshold_on_eval": self.paper_asr,
                "aucn": self.paper_aucn,
                "note": "for comparison with the SMP-LoRA paper only; ASR picks its threshold on the "
                        "evaluation set itself and is optimistic",
            },
            "n_member": self.n_member,
            "n_nonmember": self.n_nonmember,
        }


def evaluate(member: Sequence[float], nonmember: Sequence[float], *, threshold: Optional[float] = None,
             n_boot: int = 1000, seed: int = 0) -> MetricSet:
    """Every metric of the report for one attack's evaluation scores.

    ``threshold`` is the decision threshold fixed on the calibration split (``None`` leaves the
    balanced accuracy undefined); it is never tuned here.
    """
    m, n = _check(member, nonmember)
    a = auc(m, n)
    _, asr = best_threshold(m, n)
    return MetricSet(
        auc=a,
        auc_ci=auc_bootstrap_ci(m, n, n_boot=n_boot, seed=seed),
        leakage=max(a, 1.0 - a),
        tpr_at_1pct_fpr=tpr_at_fpr(m, n, 0.01),
        tpr_at_0_1pct_fpr=tpr_at_fpr(m, n, 0.001),
        balanced_accuracy=None if threshold is None else balanced_accuracy(m, n, threshold),
        threshold=threshold,
        paper_tpr_at_5pct_fpr=tpr_at_fpr(m, n, 0.05),
        paper_asr=asr,
        paper_aucn=abs(a - 0.5) / 0.5,
        n_member=int(m.size),
        n_nonmember=int(n.size),
    )
