"""The paired verdict against a baseline: DeLong AUCs and covariance, calibration, power, errors."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from smplora_plugin.audit import AuditError, AuditRun, run_audit_pooled
from smplora_plugin.audit import metrics as M
from smplora_plugin.audit.paired import BEYOND, NOT_BEYOND, compare_to_baseline, delong
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool

from _helpers import TINY_AUDIT, one_thread  # noqa: F401  (one_thread: an autouse fixture)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location("paired_calibration", BENCH / "paired_calibration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_BENCH = _bench()
_pair, _report = _BENCH.simulated_pair, _BENCH._report


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


@pytest.mark.parametrize("n_permutations", [1000, 0])
def test_false_alarms_stay_near_alpha_even_when_the_baseline_leaks(n_permutations):
    rng = np.random.default_rng(1)
    kw = dict(n_sim=5000, n_permutations=n_permutations)
    null = [compare_to_baseline(*_pair(rng, 128, 0.8, 0.0, 0.0), seed=r, **kw)["verdict"] for r in range(150)]
    # the row leaks as much as its baseline (member shift 0.4 in both, AUC ~0.61 alone): not beyond it
    inherited = [compare_to_baseline(*_pair(rng, 128, 0.9, 0.4, 0.04), seed=r, **kw)["verdict"] for r in range(100)]
    assert null.count(BEYOND) / len(null) <= 0.1
    assert inherited.count(BEYOND) / len(inherited) <= 0.1


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
    assert out["p_values"]["null"] == "1000 label permutations within runs"
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
    with pytest.raises(AuditError, match="n_permutations"):
        compare_to_baseline(row, base, n_permutations=10)
    with pytest.raises(AuditError, match="finite"):
        compare_to_baseline(bad, _report([np.zeros(32)], base.eval_labels))
