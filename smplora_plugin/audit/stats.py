"""Statistics behind the audit's verdict: permutation nulls, power, sample sizes, binomial bounds, epsilon.

Everything is plain numpy (and ``scipy.special`` for the Beta quantiles of Clopper-Pearson).
Conventions follow :mod:`.metrics`: higher score = member; AUC counts ties as one half; TPR at a
target FPR is the conservative one (largest TPR whose FPR is at most the target).

* :func:`permutation_null` permutes the evaluation labels ``B`` times over fixed per-attack scores
  (optionally within strata, e.g. within pooled runs) and returns, per permutation, each attack's
  AUC and TPR at the requested FPRs; it is vectorised through ranks and cumulative sums.
* :func:`smallest_detectable_auc` and :func:`members_needed_for_auc` use the Hanley-McNeil (1982)
  variance of the AUC with a one-sided z-test; :func:`members_needed_for_tpr` uses exact binomial
  (Clopper-Pearson) reasoning.
* :func:`epsilon_lower_bound` is the empirical privacy lower bound of privacy auditing (Nasr et al.
  2021; Steinke, Nasr & Jagielski 2023): from a TPR lower bound and an FPR upper bound of one
  threshold test. It is a lower bound on the epsilon of this training run's mechanism, never a
  guarantee.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .metrics import MetricError, _check, _midranks, roc_curve, tpr_at_fpr

_N = NormalDist()


# ---------------------------------------------------------------------------------------------
# permutation null


def permuted_labels(labels: np.ndarray, n_perm: int, *, seed: int, strata: Optional[np.ndarray] = None) -> np.ndarray:
    """``(n_perm, n)`` boolean matrix: each row a random permutation of ``labels`` (within ``strata``)."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    if n_perm < 1:
        raise MetricError(f"n_perm={n_perm} must be >= 1.")
    rng = np.random.default_rng(seed)
    groups = [np.arange(y.size)] if strata is None else [np.nonzero(strata == s)[0] for s in np.unique(strata)]
    out = np.empty((n_perm, y.size), dtype=bool)
    for g in groups:
        # argsort of uniform keys = an independent uniform permutation per row
        perm = np.argsort(rng.random((n_perm, g.size)), axis=1)
        out[:, g] = y[g][perm]
    return out


def _distinct_ends(sorted_desc: np.ndarray) -> np.ndarray:
    return np.r_[np.nonzero(np.diff(sorted_desc))[0], sorted_desc.size - 1]


def auc_matrix(scores: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` ``(n,)`` under each label row of ``perms`` ``(B, n)``: ``(B,)``."""
    s = np.asarray(scores, dtype=np.float64)
    ranks = _midranks(s)
    n1 = perms[0].sum()
    n0 = s.size - n1
    u = perms.astype(np.float64) @ ranks - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def tpr_matrix(scores: np.ndarray, perms: np.ndarray, target: float) -> Optional[np.ndarray]:
    """Conservative TPR at FPR <= ``target`` under each label row of ``perms``; ``None`` if unresolvable."""
    s = np.asarray(scores, dtype=np.float64)
    n1 = int(perms[0].sum())
    n0 = s.size - n1
    if n0 < math.ceil(1.0 / target - 1e-9):
        return None
    order = np.argsort(-s, kind="mergesort")
    ends = _distinct_ends(s[order])
    lab = perms[:, order]
    tp = np.cumsum(lab, axis=1)[:, ends]
    fp = (ends + 1)[None, :] - tp
    ok = fp <= target * n0 + 1e-9
    return np.where(ok, tp, 0).max(axis=1) / n1


def permutation_pvalue(observed: float, null: np.ndarray) -> float:
    """``(1 + #{null >= observed}) / (B + 1)``: a valid p-value for a permutation test."""
    null = np.asarray(null)
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (null.size + 1))


def envelope_null(scores: Dict[str, np.ndarray], labels: np.ndarray, *, n_perm: int = 1000, seed: int = 0,
                  strata: Optional[np.ndarray] = None, fprs: Sequence[float] = (0.01,)) -> Dict[str, np.ndarray]:
    """Per-permutation statistics for every attack: ``{"auc": (B, A), "tpr@<fpr>": (B, A) or absent}``.

    ``scores`` maps attack name -> evaluation scores (same sample order as ``labels``). The label
    permutations are shared by all attacks (so the maximum over attacks is the null of the
    maximum), and stratified by ``strata`` when given.
    """
    names = list(scores)
    y = np.asarray(labels).astype(bool)
    if not names:
        raise MetricError("no attack scores to permute.")
    if y.sum() == 0 or (~y).sum() == 0:
        raise MetricError("the permutation null needs members and non-members.")
    perms = permuted_labels(y, n_perm, seed=seed, strata=strata)
    out: Dict[str, np.ndarray] = {"auc": np.stack([auc_matrix(scores[a], perms) for a in names], 1)}
    for f in fprs:
        cols = [tpr_matrix(scores[a], perms, f) for a in names]
        if all(c is not None for c in cols):
            out[f"tpr@{f:g}"] = np.stack(cols, 1)
    return out


# ---------------------------------------------------------------------------------------------
# power and sample size


def hanley_mcneil_var(a: float, n1: int, n0: int) -> float:
    """Hanley & McNeil (1982) variance of the AUC estimate at true AUC ``a`` (n1 members, n0 non-members)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)


def _power_gap(a: float, n1: int, n0: int, alpha: float, power: float) -> float:
    """Positive when a one-sided level-``alpha`` test of AUC = 0.5 detects AUC ``a`` with ``power``."""
    z_a, z_b = _N.inv_cdf(1 - alpha), _N.inv_cdf(power)
    return (a - 0.5) - z_a * math.sqrt(hanley_mcneil_var(0.5, n1, n0)) - z_b * math.sqrt(hanley_mcneil_var(a, n1, n0))


def smallest_detectable_auc(n1: int, n0: int, *, alpha: float = 0.025, power: float = 0.8) -> float:
    """Smallest true AUC that a one-sided level-``alpha`` test detects with ``power`` (normal approx.).

    Returns 1.0 when even a perfect attack cannot be detected at this size.
    """
    if n1 < 1 or n0 < 1:
        raise MetricError(f"need at least one member and one non-member, got {n1} and {n0}.")
    if _power_gap(1.0 - 1e-12, n1, n0, alpha, power) < 0:
        return 1.0
    lo, hi = 0.5, 1.0 - 1e-12
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _power_gap(mid, n1, n0, alpha, power) >= 0:
            hi = mid
        else:
            lo = mid
    return hi


def members_needed_for_auc(target_auc: float, *, alpha: float = 0.025, power: float = 0.8) -> int:
    """Members = non-members per side (evaluation split) to detect ``target_auc`` with ``power``."""
    if not 0.5 < target_auc < 1:
        raise MetricError(f"target_auc={target_auc} must be in (0.5, 1).")
    return _smallest_n(lambda n: _power_gap(target_auc, n, n, alpha, power) >= 0)


def _smallest_n(ok, start: int = 2, limit: int = 10 ** 9) -> int:
    hi = start
    while not ok(hi):
        hi *= 2
        if hi > limit:
            raise MetricError("the required sample size exceeds 10^9; the target is not detectable.")
    lo = max(start, hi // 2)
    if ok(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def clopper_pearson(k: int, n: int, *, level: float = 0.95, side: str = "two-sided") -> Tuple[float, float]:
    """Clopper-Pearson interval for a binomial proportion ``k / n``.

    ``side="two-sided"``: ``(1 - level) / 2`` in each tail. ``"lower"`` / ``"upper"``: a one-sided
    bound at ``level`` (the other end is 0 or 1).
    """
    from scipy.special import betaincinv

    if not (0 <= k <= n) or n < 1:
        raise MetricError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    if side not in ("two-sided", "lower", "upper"):
        raise MetricError(f"side={side!r} must be 'two-sided', 'lower' or 'upper'.")
    a = (1 - level) / 2 if side == "two-sided" else 1 - level
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, a))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - a))
    if side == "lower":
        hi = 1.0
    elif side == "upper":
        lo = 0.0
    return lo, hi


def _binom_pmf(n: int, p: float) -> np.ndarray:
    k = np.arange(n + 1)
    if p <= 0 or p >= 1:
        return (k == (0 if p <= 0 else n)).astype(float)
    from scipy.special import gammaln

    logc = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return np.exp(logc + k * math.log(p) + (n - k) * math.log1p(-p))


def tpr_detection_power(n: int, target_tpr: float, fpr: float, *, level: float = 0.975) -> float:
    """P(the CP lower bound of the TPR exceeds the CP upper bound of the FPR) with ``n`` per side.

    At a threshold that admits ``floor(fpr * n)`` false positives, the number of members above
    it is Binomial(n, target_tpr); the attack is shown to beat its FPR when the one-sided
    ``level`` Clopper-Pearson lower bound of the TPR exceeds the one-sided upper bound of the FPR.
    """
    from scipy.special import betaincinv

    k_fp = int(math.floor(fpr * n + 1e-9))
    fpr_hi = clopper_pearson(k_fp, n, level=level, side="upper")[1]
    k = np.arange(1, n + 1)
    lower = betaincinv(k, n - k + 1, 1 - level)  # one-sided CP lower bounds, increasing in k
    clear = np.nonzero(lower > fpr_hi)[0]
    if clear.size == 0:
        return 0.0
    return float(_binom_pmf(n, target_tpr)[int(k[clear[0]]):].sum())


def members_needed_for_tpr(target_tpr: float, fpr: float = 0.01, *, power: float = 0.8, level: float = 0.975) -> int:
    """Members = non-members per side to show TPR ``target_tpr`` at ``fpr`` (see :func:`tpr_detection_power`).

    At least ``10 / fpr`` per side, so that the threshold admits >= 10 false positives and is
    not set by one or two outlying non-members.
    """
    if not 0 < fpr < target_tpr < 1:
        raise MetricError(f"need 0 < fpr < target_tpr < 1, got fpr={fpr}, target_tpr={target_tpr}.")
    floor_n = int(math.ceil(10.0 / fpr - 1e-9))
    # doubling then bisection; the binomial lattice makes the power only nearly monotone in n
    n = _smallest_n(lambda m: tpr_detection_power(m, target_tpr, fpr, level=level) >= power, start=floor_n)
    return n


# ---------------------------------------------------------------------------------------------
# TPR at low FPR with uncertainty


def tpr_at_fpr_bootstrap_ci(member: Sequence[float], nonmember: Sequence[float], target: float, *, n_boot: int = 1000,
                            level: float = 0.95, seed: int = 0) -> Optional[Tuple[float, float]]:
    """Percentile bootstrap CI (stratified) of the conservative TPR at FPR <= ``target``; ``None`` if n/a."""
    m, n = _check(member, nonmember)
    if n.size < math.ceil(1.0 / target - 1e-9):
        return None
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        vals[b] = tpr_at_fpr(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)], target)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def low_fpr_summary(member: Sequence[float], nonmember: Sequence[float], targets: Sequence[float] = (0.01, 0.001), *,
                    n_boot: int = 1000, seed: int = 0) -> Dict[str, Dict[str, object]]:
    """Per target FPR: TPR, bootstrap CI, false positives the threshold allows, low-reliability flag."""
    m, n = _check(member, nonmember)
    out: Dict[str, Dict[str, object]] = {}
    for f in targets:
        ci = tpr_at_fpr_bootstrap_ci(m, n, f, n_boot=n_boot, seed=seed)
        out[f"{100 * f:g}%"] = {
            "fpr": f,
            "tpr": tpr_at_fpr(m, n, f),
            "tpr_ci95": None if ci is None else list(ci),
            "false_positives_allowed": int(math.floor(f * n.size + 1e-9)),
            "low_reliability": bool(n.size < 10.0 / f),
        }
    return out


# ---------------------------------------------------------------------------------------------
# empirical epsilon lower bound


def epsilon_from_rates(tpr_lo: float, fpr_hi: float, delta: float = 0.0) -> float:
    """``max(log((TPR_lo - delta) / FPR_hi), log((1 - delta - FPR_hi) / (1 - TPR_lo)), 0)``.

    Any (epsilon, delta)-DP mechanism satisfies TPR <= e^eps FPR + delta and
    1 - FPR <= e^eps (1 - TPR) + delta for every test; these are the largest eps the bounds refute.
    """
    cands = [0.0]
    if fpr_hi > 0 and tpr_lo - delta > 0:
        cands.append(math.log((tpr_lo - delta) / fpr_hi))
    if tpr_lo < 1 and 1 - delta - fpr_hi > 0:
        cands.append(math.log((1 - delta - fpr_hi) / (1 - tpr_lo)))
    if fpr_hi == 0 and tpr_lo - delta > 0:
        cands.append(math.inf)
    return max(cands)


def epsilon_lower_bound(tp: int, n1: int, fp: int, n0: int, *, level: float = 0.95,
                        delta: float = 0.0) -> Dict[str, float]:
    """Empirical epsilon lower bound from one threshold test's counts on the evaluation split.

    ``TPR_lo`` is the one-sided ``level`` Clopper-Pearson lower bound of ``tp / n1`` and ``FPR_hi``
    the one-sided upper bound of ``fp / n0`` (jointly they hold with probability >= 2 level - 1).
    """
    tpr_lo = clopper_pearson(tp, n1, level=level, side="lower")[0]
    fpr_hi = clopper_pearson(fp, n0, level=level, side="upper")[1]
    return {"epsilon": epsilon_from_rates(tpr_lo, fpr_hi, delta), "tpr_lower": tpr_lo, "fpr_upper": fpr_hi,
            "tp": int(tp), "n_member": int(n1), "fp": int(fp), "n_nonmember": int(n0), "delta": delta}


def best_epsilon_threshold(member: Sequence[float], nonmember: Sequence[float], *, level: float = 0.95,
                           delta: float = 0.0) -> Tuple[float, float]:
    """``(threshold, eps)``: the threshold whose epsilon lower bound is largest on these (calibration) scores.

    The threshold is placed midway between adjacent distinct scores; ``+inf`` when no threshold
    gives a positive bound.
    """
    m, n = _check(member, nonmember)
    fpr, tpr, thr = roc_curve(m, n)
    best = (math.inf, 0.0)
    for i in range(1, thr.size):
        e = epsilon_from_rates(clopper_pearson(int(round(tpr[i] * m.size)), m.size, level=level, side="lower")[0],
                               clopper_pearson(int(round(fpr[i] * n.size)), n.size, level=level, side="upper")[1],
                               delta)
        if e > best[1] + 1e-12:
            lower = thr[i + 1] if i + 1 < thr.size else thr[i] - 1.0
            best = (float(0.5 * (thr[i] + lower)), e)
    return best


def ks_uniform_distance(p: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``p`` and the uniform on [0, 1]."""
    x = np.sort(np.asarray(p, dtype=np.float64))
    k = np.arange(1, x.size + 1)
    return float(max(np.max(k / x.size - x), np.max(x - (k - 1) / x.size)))


__all__: List[str] = [
    "auc_matrix", "best_epsilon_threshold", "clopper_pearson", "envelope_null", "epsilon_from_rates",
    "epsilon_lower_bound", "hanley_mcneil_var", "ks_uniform_distance", "low_fpr_summary", "members_needed_for_auc",
    "members_needed_for_tpr", "permutation_pvalue", "permuted_labels", "smallest_detectable_auc",
    "tpr_at_fpr_bootstrap_ci", "tpr_detection_power", "tpr_matrix",
]
