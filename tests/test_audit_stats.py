"""Statistics behind the verdict: permutation null, power, sample sizes, Clopper-Pearson, epsilon."""

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from smplora_plugin.audit import metrics as M
from smplora_plugin.audit import stats as S


def _all_labelings(n, n1):
    for members in itertools.combinations(range(n), n1):
        y = np.zeros(n, dtype=bool)
        y[list(members)] = True
        yield y


def test_auc_and_tpr_under_permutations_match_a_loop():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=12), 1)  # ties included
    y = np.r_[np.ones(5, bool), np.zeros(7, bool)]
    perms = S.permuted_labels(y, 50, seed=3)
    assert (perms.sum(1) == 5).all()
    aucs = S.auc_matrix(s, perms)
    for b in range(50):
        assert aucs[b] == pytest.approx(M.auc(s[perms[b]], s[~perms[b]]), abs=1e-12)
    s2 = rng.normal(size=230)
    y2 = np.r_[np.ones(30, bool), np.zeros(200, bool)]
    p2 = S.permuted_labels(y2, 40, seed=1)
    tprs = S.tpr_matrix(s2, p2, 0.01)
    for b in range(40):
        assert tprs[b] == pytest.approx(M.tpr_at_fpr(s2[p2[b]], s2[~p2[b]], 0.01), abs=1e-12)
    assert S.tpr_matrix(s2[:60], p2[:, :60], 0.01) is None  # 30 non-members cannot resolve 1% FPR


def test_permutation_pvalue_matches_exhaustive_enumeration():
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.7])
    y = np.array([0, 1, 0, 1, 1, 0, 0], dtype=bool)
    obs = M.auc(s[y], s[~y])
    exact = np.mean([M.auc(s[lab], s[~lab]) >= obs - 1e-12 for lab in _all_labelings(7, 3)])  # 35 labelings
    null = S.auc_matrix(s, S.permuted_labels(y, 20000, seed=0))
    assert S.permutation_pvalue(obs, null) == pytest.approx(exact, abs=0.01)


def test_envelope_null_is_the_max_over_attacks_with_shared_permutations():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(10), np.zeros(10)].astype(bool)
    scores = {"a": rng.normal(size=20), "b": rng.normal(size=20)}
    null = S.envelope_null(scores, y, n_perm=300, seed=5)
    perms = S.permuted_labels(y, 300, seed=5)
    for b in (0, 17, 299):
        for j, k in enumerate(scores):
            assert null["auc"][b, j] == pytest.approx(M.auc(scores[k][perms[b]], scores[k][~perms[b]]))
    assert "tpr@0.01" not in null  # 10 non-members


def test_stratified_permutations_keep_each_stratum_counts():
    y = np.r_[np.ones(3), np.zeros(5), np.ones(6), np.zeros(2)].astype(bool)
    strata = np.r_[np.zeros(8), np.ones(8)]
    perms = S.permuted_labels(y, 200, seed=0, strata=strata)
    assert (perms[:, :8].sum(1) == 3).all() and (perms[:, 8:].sum(1) == 6).all()
    assert len({tuple(r) for r in perms[:, :8]}) > 20  # actually permuted


def test_hanley_mcneil_variance_at_half_is_close_to_mann_whitney():
    for n1, n0 in ((10, 10), (50, 200)):
        exact = (n1 + n0 + 1) / (12 * n1 * n0)
        assert S.hanley_mcneil_var(0.5, n1, n0) == pytest.approx(exact, rel=0.1)


def _binormal_power(auc_true, n, reps, alpha=0.025, seed=0):
    """Rejection rate of the one-sided normal-approximation AUC test, simulated."""
    rng = np.random.default_rng(seed)
    shift = math.sqrt(2) * NormalDist().inv_cdf(auc_true)  # binormal, unit variances
    m = rng.normal(shift, 1, size=(reps, n))
    nm = rng.normal(0, 1, size=(reps, n))
    aucs = np.array([M._auc_fast(m[i], nm[i]) for i in range(reps)])
    crit = 0.5 + NormalDist().inv_cdf(1 - alpha) * math.sqrt((2 * n + 1) / (12 * n * n))
    return float(np.mean(aucs > crit))


@pytest.mark.parametrize("n", [25, 100])
def test_smallest_detectable_auc_has_the_stated_power_in_simulation(n):
    a = S.smallest_detectable_auc(n, n)
    assert 0.5 < a < 1
    assert _binormal_power(a, n, 3000) == pytest.approx(0.8, abs=0.05)
    assert _binormal_power(0.5, n, 3000, seed=1) < 0.04  # the level holds under the null


def test_sample_size_for_auc_is_the_smallest_that_reaches_the_power():
    n = S.members_needed_for_auc(0.6)
    assert S.smallest_detectable_auc(n, n) <= 0.6 < S.smallest_detectable_auc(n - 1, n - 1)
    assert _binormal_power(0.6, n, 2000, seed=2) == pytest.approx(0.8, abs=0.05)
    assert S.smallest_detectable_auc(16, 8) > 0.75  # the 16 / 8 case cannot tell
    assert S.smallest_detectable_auc(2, 2) == 1.0


def test_clopper_pearson_known_values():
    # k = 0 and k = n have closed forms; (5, 10) and (1, 20) are textbook values
    assert S.clopper_pearson(0, 10, side="upper") == pytest.approx((0.0, 1 - 0.05 ** (1 / 10)))
    assert S.clopper_pearson(10, 10, side="lower") == pytest.approx((0.05 ** (1 / 10), 1.0))
    assert S.clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert S.clopper_pearson(1, 20) == pytest.approx((0.001265, 0.248733), abs=1e-6)
    assert S.clopper_pearson(0, 100, level=0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / 100)))
    with pytest.raises(M.MetricError):
        S.clopper_pearson(3, 2)


def test_tpr_detection_power_matches_simulation():
    n, tpr, fpr = 400, 0.1, 0.01
    exact = S.tpr_detection_power(n, tpr, fpr)
    rng = np.random.default_rng(0)
    k = rng.binomial(n, tpr, size=4000)
    fpr_hi = S.clopper_pearson(int(math.floor(fpr * n)), n, level=0.975, side="upper")[1]
    lows = {int(v): S.clopper_pearson(int(v), n, level=0.975, side="lower")[0] for v in np.unique(k)}
    sim = np.mean([lows[int(v)] > fpr_hi for v in k])
    assert exact == pytest.approx(sim, abs=0.03)
    need = S.members_needed_for_tpr(0.1, 0.01)
    assert need >= 1000 and S.tpr_detection_power(need, 0.1, 0.01) >= 0.8
    assert S.members_needed_for_tpr(0.05, 0.01) > S.members_needed_for_tpr(0.3, 0.01) - 1


def test_epsilon_lower_bound_by_hand():
    # all 20 members above the threshold, no non-member: TPR_lo = 0.05^(1/20), FPR_hi = 1 - 0.05^(1/20)
    b = S.epsilon_lower_bound(20, 20, 0, 20)
    lo = 0.05 ** (1 / 20)
    assert b["tpr_lower"] == pytest.approx(lo) and b["fpr_upper"] == pytest.approx(1 - lo)
    assert b["epsilon"] == pytest.approx(math.log(lo / (1 - lo)))
    # no separation: no positive bound
    assert S.epsilon_lower_bound(10, 20, 10, 20)["epsilon"] == 0.0
    # delta lowers the bound
    assert S.epsilon_lower_bound(20, 20, 0, 20, delta=0.1)["epsilon"] < b["epsilon"]
    assert S.epsilon_from_rates(0.5, 0.1) == pytest.approx(max(math.log(5), math.log(0.9 / 0.5)))


def test_best_epsilon_threshold_separates_perfectly_separated_scores():
    thr, eps = S.best_epsilon_threshold(np.arange(9.0, 17.0), np.arange(1.0, 9.0))
    assert 8.0 < thr < 9.0 and eps == pytest.approx(S.epsilon_lower_bound(8, 8, 0, 8)["epsilon"]) and eps > 0
    # 4 + 4 perfectly separated samples cannot refute any epsilon at 95%: TPR_lo 0.47 < FPR_hi 0.53
    assert S.best_epsilon_threshold([5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]) == (math.inf, 0.0)
    thr, eps = S.best_epsilon_threshold([1.0, 2.0], [1.0, 2.0])
    assert eps == 0.0 and thr == math.inf


def test_low_fpr_summary_counts_and_flags():
    rng = np.random.default_rng(0)
    out = S.low_fpr_summary(rng.normal(1, 1, 50), rng.normal(0, 1, 300), n_boot=200)
    one = out["1%"]
    assert one["false_positives_allowed"] == 3 and one["low_reliability"] is True  # 300 < 10 / 0.01
    lo, hi = one["tpr_ci95"]
    assert 0 <= lo <= one["tpr"] <= hi <= 1
    assert out["0.1%"]["tpr"] is None and out["0.1%"]["tpr_ci95"] is None
    big = S.low_fpr_summary(rng.normal(1, 1, 20), rng.normal(0, 1, 1000), targets=(0.01,), n_boot=50)
    assert big["1%"]["low_reliability"] is False and big["1%"]["false_positives_allowed"] == 10


def test_ks_distance_of_uniform_grid_is_small():
    assert S.ks_uniform_distance((np.arange(100) + 0.5) / 100) == pytest.approx(0.005)
    assert S.ks_uniform_distance(np.zeros(10)) == pytest.approx(1.0)
