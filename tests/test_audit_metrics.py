"""Audit metrics against scikit-learn on fixed inputs; conservative TPR at low FPR."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from smplora_plugin.audit import metrics as M


def _fixed(seed, n_m=57, n_n=83, shift=0.5, decimals=1):
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(shift, 1, n_m), decimals), np.round(rng.normal(0, 1, n_n), decimals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_auc_match_sklearn_with_ties(seed):
    m, n = _fixed(seed)  # rounding to 0.1 creates many ties within and across classes
    y = np.r_[np.ones(m.size), np.zeros(n.size)]
    s = np.r_[m, n]
    fpr, tpr, thr = sk_roc_curve(y, s, drop_intermediate=False)
    f2, t2, th2 = M.roc_curve(m, n)
    np.testing.assert_allclose(f2, fpr)
    np.testing.assert_allclose(t2, tpr)
    np.testing.assert_allclose(th2[1:], thr[1:])
    assert M.auc(m, n) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M._auc_fast(m, n) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_known_values():
    assert M.auc([3, 4], [1, 2]) == 1.0
    assert M.auc([1, 2], [3, 4]) == 0.0
    assert M.auc([1, 1], [1, 1]) == 0.5
    assert M.auc([2, 0], [1]) == 0.5


def test_tpr_at_fpr_is_conservative():
    # 100 non-members at 0..99; members chosen so the 1% point needs care
    n = np.arange(100, dtype=float)
    m = np.array([99.5, 98.5, 98.4, 50.0])
    # FPR 0 -> threshold above 99: TPR 1/4; FPR 1% (one non-member, 99) -> 98.5 included: 3/4
    assert M.tpr_at_fpr(m, n, 0.01) == pytest.approx(0.75)
    # never interpolated: a target between two ROC points takes the lower one
    assert M.tpr_at_fpr(m, n, 0.015) == pytest.approx(0.75)
    # largest TPR with FPR <= target, checked against sklearn's curve
    fpr, tpr, _ = sk_roc_curve(np.r_[np.ones(4), np.zeros(100)], np.r_[m, n], drop_intermediate=False)
    for target in (0.01, 0.05, 0.2, 0.5):
        assert M.tpr_at_fpr(m, n, target) == pytest.approx(tpr[fpr <= target].max())


def test_tpr_at_fpr_na_with_too_few_nonmembers():
    m, n = _fixed(0, n_n=99)
    assert M.tpr_at_fpr(m, n, 0.01) is None
    assert M.tpr_at_fpr(m, n, 0.05) is not None
    m, n = _fixed(0, n_n=100)
    assert M.tpr_at_fpr(m, n, 0.01) is not None
    assert M.tpr_at_fpr(m, n, 0.001) is None


def test_bootstrap_ci_is_seeded_and_covers_auc():
    m, n = _fixed(3, shift=1.0, decimals=6)
    a = M.auc(m, n)
    lo, hi = M.auc_bootstrap_ci(m, n, n_boot=500, seed=1)
    assert lo < a < hi
    assert (lo, hi) == M.auc_bootstrap_ci(m, n, n_boot=500, seed=1)
    assert (lo, hi) != M.auc_bootstrap_ci(m, n, n_boot=500, seed=2)
    # the stratified resample keeps class sizes: a perfect separation stays perfect
    assert M.auc_bootstrap_ci([5, 6, 7], [1, 2, 3], n_boot=50) == (1.0, 1.0)


def test_null_band_matches_the_formula():
    lo, hi = M.null_band(50, 50)
    assert hi - 0.5 == pytest.approx(0.114, abs=0.001)
    lo, hi = M.null_band(200, 200)
    assert hi - 0.5 == pytest.approx(0.057, abs=0.001)


def test_threshold_and_balanced_accuracy():
    m, n = np.array([5.0, 6.0, 7.0, 2.0]), np.array([1.0, 2.5, 3.0, 4.0])
    thr, bacc = M.best_threshold(m, n)
    assert 4.0 < thr < 5.0 and bacc == pytest.approx(0.875)
    assert M.balanced_accuracy(m, n, thr) == pytest.approx(bacc)
    # a threshold fixed elsewhere is applied, not re-tuned
    assert M.balanced_accuracy(m, n, 100.0) == pytest.approx(0.5)


def test_evaluate_leakage_is_two_sided_and_paper_fields():
    m, n = _fixed(4, shift=-1.5, decimals=6, n_n=120)  # members score LOWER: an "anti-member" attack
    ms = M.evaluate(m, n, threshold=0.0, n_boot=200)
    assert ms.auc < 0.2 and ms.leakage == pytest.approx(1 - ms.auc)
    assert ms.paper_aucn == pytest.approx(abs(ms.auc - 0.5) / 0.5)
    d = ms.to_dict()
    assert d["tpr_at_1pct_fpr"] is not None and d["tpr_at_0.1pct_fpr"] is None
    assert "paper_comparison" in d and "optimistic" in d["paper_comparison"]["note"]


def test_bad_scores_raise():
    with pytest.raises(M.MetricError, match="at least one member"):
        M.auc([], [1.0])
    with pytest.raises(M.MetricError, match="NaN"):
        M.auc([np.nan], [1.0])
