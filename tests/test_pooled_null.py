"""The pooled-null redraw machinery (benchmarks/pooled_null.py) on synthetic, label-independent scores."""

import numpy as np
import pytest

from benchmarks.pooled_null import Fit, draw_verdict, measure, rate
from smplora_plugin.audit.config import AuditConfig
from smplora_plugin.audit.pooled import pool_scores
from smplora_plugin.audit.scoring import attack_metrics
from smplora_plugin.audit.verdict import LEAKS, assess

N_POOL, CAL = 240, 40


def _bank(n_fits: int, seed: int = 0):
    """Fits whose scores do not depend on who is a member (an untouched model): 3 correlated attacks."""
    rng = np.random.default_rng(seed)
    difficulty = rng.standard_normal(N_POOL)
    base = {f"a{i}": difficulty + 0.7 * rng.standard_normal(N_POOL) for i in range(3)}
    fits = []
    for i in range(n_fits):
        perm = np.random.default_rng([seed, i]).permutation(N_POOL)
        mem, non = np.sort(perm[:CAL]), np.sort(perm[CAL:2 * CAL])
        ci = np.r_[mem, non]
        lab = np.isin(ci, mem)
        cal_auc = {a: float(np.mean(s[ci][lab][:, None] > s[ci][~lab][None, :])) for a, s in base.items()}
        fits.append(Fit(mem, non, dict(base), {a: ci for a in base}, cal_auc, {a: True for a in base}))
    return fits


def test_label_independent_scores_give_a_rate_near_alpha():
    fits = _bank(30)
    single = rate(measure(fits, 1, 40, 300, N_POOL))
    pooled = rate(measure(fits, 4, 40, 150, N_POOL))
    for q in (single, pooled):
        assert 0.0 < q["rate"] <= 0.10  # nominal at most 0.05
        assert q["ci95"][0] <= 0.05 <= q["ci95"][1] or q["rate"] < 0.05
        assert q["by_headline"] + q["by_envelope"] >= q["leaks"]


def test_a_planted_signal_is_found():
    fits = _bank(8)
    assert rate(measure(fits, 1, 40, 40, N_POOL, plant=1.5))["rate"] >= 0.95
    assert rate(measure(fits, 4, 40, 20, N_POOL, plant=0.5))["rate"] >= 0.95


def test_draws_come_from_outside_the_calibration_draw():
    f = _bank(1)[0]
    free = f.free(N_POOL)
    assert free.size == N_POOL - 2 * CAL and not np.isin(free, np.r_[f.members, f.nonmembers]).any()
    scores, y = f.run(free[:10], free[10:30])
    assert y.tolist() == [1] * 10 + [0] * 20
    assert scores["a0"].eval_scores.tolist() == f.scores["a0"][np.r_[free[:10], free[10:30]]].tolist()
    assert scores["a0"].cal_labels.sum() == CAL  # the calibration members keep their labels
    with pytest.raises(Exception, match="fits"):
        measure(_bank(2), 4, 10, 1, N_POOL)


@pytest.mark.parametrize("runs", [1, 3])
def test_draw_verdict_is_the_audits_verdict(runs):
    """The benchmark's shortcut (no bootstrap CIs) gives the verdict and p-values of verdict.assess."""
    fits = _bank(runs, seed=3)
    got = draw_verdict(fits, np.random.default_rng(11), 40, N_POOL, plant=0.3)
    rng = np.random.default_rng(11)
    runs_scores, labels = [], []
    for f in fits:
        pick = rng.permutation(f.free(N_POOL))[:80]
        sc, y = f.run(np.sort(pick[:40]), np.sort(pick[40:]), plant=0.3)
        runs_scores.append(sc)
        labels.append(y)
    scores = runs_scores[0] if runs == 1 else pool_scores(runs_scores, list(runs_scores[0]))
    y = np.concatenate(labels)
    cfg = AuditConfig(n_boot=20)
    results = {}
    for a, s in scores.items():
        results[a] = attack_metrics(a, True, s.eval_scores[y == 1], s.eval_scores[y == 0], None, cfg)
        results[a]["calibration"] = {"calibration_auc": fits[0].cal_auc[a] if runs == 1 else s.calibration_auc}
    strata = None if runs == 1 else np.concatenate([np.full(v.size, i) for i, v in enumerate(labels)])
    v = assess(scores, y, results, seed=0, strata=strata)
    assert got["verdict"] == v["verdict"]
    assert got["p_headline"] == v["p_values"]["headline"] and got["p_envelope"] == v["p_values"]["upper_envelope_auc"]
    assert got["headline"] == v["headline"]["attack"]


def test_rate_interval():
    q = rate([{"verdict": LEAKS, "p_headline": 0.01, "p_envelope": 0.5}] * 5
             + [{"verdict": "no", "p_headline": 0.5, "p_envelope": 0.5}] * 95)
    assert q["leaks"] == 5 and q["rate"] == 0.05 and q["by_headline"] == 5 and q["by_envelope"] == 0
    lo, hi = q["ci95"]
    assert 0.015 < lo < 0.05 < hi < 0.12
