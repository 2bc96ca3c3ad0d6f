"""The paired verdict against a baseline: DeLong AUCs and covariance, calibration, power, errors."""

from types import SimpleNamespace

import numpy as np
import pytest

from smplora_plugin.audit import AuditError, AuditRun, run_audit_pooled
from smplora_plugin.audit import metrics as M
from smplora_plugin.audit.paired import BEYOND, NOT_BEYOND, compare_to_baseline, delong
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool
from smplora_plugin.audit.verdict import AttackScores
from _helpers import TINY_AUDIT, one_thread  # noqa: F401  (one_thread: an autouse fixture)


def _report(scores, labels):
    cal = np.array([1, 1, 0, 0])
    return SimpleNamespace(scores={f"a{k}": AttackScores(s, s[:4], cal) for k, s in enumerate(scores)},
                           eval_labels=labels, verdict=None)


def _pair(rng, n, rho, base_shift, row_shift, k=3):
    """Row and baseline scores of ``k`` attacks sharing per-sample difficulty (correlation ``rho``)."""
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    common = rng.standard_normal(2 * n)
    base = np.stack([0.7 * common + 0.7 * rng.standard_normal(2 * n) for _ in range(k)]) + base_shift * y
    row = rho * base + np.sqrt(1 - rho ** 2) * rng.standard_normal(base.shape) + row_shift * y
    return _report(row, y), _report(base, y)


def test_delong_aucs_and_variances_match_the_bootstrap():
    rng = np.random.default_rng(0)
    n = 200
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    s = rng.standard_normal((2, 2 * n))
    s[0, :n] += 0.5
    s[1] = np.round(s[1], 1)  # ties
    auc, cov = delong(s, y)
    assert auc == pytest.approx([M.auc(x[y == 1], x[y == 0]) for x in s])
    boot = []
    for _ in range(1500):
        i, j = rng.integers(0, n, n), n + rng.integers(0, n, n)
        boot.append([M.auc(x[i], x[j]) for x in s])
    assert np.diag(cov) == pytest.approx(np.var(boot, 0), rel=0.15)


def test_false_alarms_stay_near_alpha_even_when_the_baseline_leaks():
    rng = np.random.default_rng(1)
    null = [compare_to_baseline(*_pair(rng, 128, 0.8, 0.0, 0.0), n_sim=5000, seed=r)["verdict"] for r in range(150)]
    inherited = [compare_to_baseline(*_pair(rng, 128, 1.0, 0.4, 0.0), n_sim=5000, seed=r)["verdict"]
                 for r in range(50)]
    assert null.count(BEYOND) / len(null) <= 0.1
    # the row alone leaks as much as its baseline (AUC ~0.61): that is not leakage beyond it
    assert inherited.count(BEYOND) == 0


def test_a_row_that_adds_leakage_is_caught():
    rng = np.random.default_rng(2)
    row, base = _pair(rng, 128, 0.8, 0.0, 0.4)
    out = compare_to_baseline(row, base, n_sim=5000)
    assert out["verdict"] == BEYOND and out["p_values"]["envelope"] < 0.025
    assert out["envelope"]["difference"] > 0.1 and out["headline"]["attack"] in out["per_attack"]
    d = out["per_attack"]["a0"]
    assert d["difference"] == pytest.approx(d["auc"] - d["baseline_auc"])
    assert d["difference_ci95"][0] < d["difference"] < d["difference_ci95"][1]


def test_pooled_audits_compare_end_to_end():
    def runs(strength):
        out = []
        for seed in (1, 2):
            pool = synthetic_pool(32, (1, 4, 4), seed=seed)
            out.append(AuditRun(MemorizingTarget(pool[:16], strength=strength), pool[:16], pool[16:], name=f"r{seed}"))
        return out

    attacks = ["loss", "loss_calibrated", "sima", "blind"]
    base = run_audit_pooled(runs(0.0), attacks=attacks, config=TINY_AUDIT, progress=False)
    leaky = run_audit_pooled(runs(1.0), attacks=attacks, config=TINY_AUDIT, progress=False)
    out = compare_to_baseline(leaky, base, n_sim=5000)
    assert out["verdict"] == BEYOND and "blind" not in out["per_attack"]
    assert compare_to_baseline(base, base, n_sim=5000)["verdict"] == NOT_BEYOND  # identical: nothing tested


def test_bad_pairs_are_refused():
    rng = np.random.default_rng(3)
    row, base = _pair(rng, 16, 0.8, 0.0, 0.0)
    other = _report([rng.standard_normal(30)], np.r_[np.ones(15), np.zeros(15)].astype(int))
    with pytest.raises(AuditError, match="same evaluation samples"):
        compare_to_baseline(row, other)
    with pytest.raises(AuditError, match="no scores"):
        compare_to_baseline(row, SimpleNamespace(scores=None, eval_labels=None))
    with pytest.raises(AuditError, match="share no model-using attack"):
        compare_to_baseline(row, _report([], base.eval_labels))
    bad = _report([np.r_[np.nan, np.zeros(31)]], base.eval_labels)
    with pytest.raises(AuditError, match="finite"):
        compare_to_baseline(bad, _report([np.zeros(32)], base.eval_labels))
