"""RMIA's score breaks the ties of the paper's fraction (issue 27, item 5), without reordering its steps."""

import numpy as np
import pytest

from smplora_plugin.audit import metrics as M
from smplora_plugin.audit.attacks.rmia import rmia_scores


def _lr_case(seed: int, n_pop: int = 64, n_eval: int = 500, shift: float = 4.0):
    """``log LR`` of a population (calibration non-members) and of evaluation members / non-members.

    Plain-LoRA-like: members sit ``shift`` population SDs above the non-members, so most members and
    a few non-members lie above the whole population."""
    rng = np.random.default_rng(seed)
    ell = np.r_[rng.standard_normal(n_pop), rng.standard_normal(n_eval), shift + rng.standard_normal(n_eval)]
    pop = np.arange(n_pop)
    non = np.arange(n_pop, n_pop + n_eval)
    mem = np.arange(n_pop + n_eval, n_pop + 2 * n_eval)
    # Pr(x | target) = exp(ell) and Pr(x) = 1 from two identical references give LR(x) = exp(ell)
    pr_t = np.exp(ell)
    pr_r = np.ones((2, ell.size))
    return pr_t, pr_r, np.zeros((2, ell.size), dtype=bool), pop, mem, non, ell


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separated_scores_resolve_tpr_at_low_fpr(seed):
    pr_t, pr_r, inside, pop, mem, non, ell = _lr_case(seed)
    old = rmia_scores(pr_t, pr_r, inside, pop, gamma=1.0, continuous=False)
    new = rmia_scores(pr_t, pr_r, inside, pop, gamma=1.0)
    # the paper's fraction: members and the non-members above the whole population tie at 1.0 ...
    top_non = int((old[non] == 1.0).sum())
    assert top_non > 0.01 * non.size and (old[mem] == 1.0).mean() > 0.9
    assert M.tpr_at_fpr(old[mem], old[non], 0.01) == 0.0  # ... so the TPR at 1% FPR cannot be resolved
    # the continuous score ranks exactly as log LR does, so the low-FPR TPR is that of the LR itself
    tpr_new = M.tpr_at_fpr(new[mem], new[non], 0.01)
    assert tpr_new > 0.3
    assert tpr_new == pytest.approx(M.tpr_at_fpr(ell[mem], ell[non], 0.01))
    assert M.tpr_at_fpr(new[mem], new[non], 0.002) > 0.0  # 1 false positive in 500 allowed
    assert M.auc(new[mem], new[non]) == pytest.approx(M.auc(ell[mem], ell[non]))
    assert M.auc(new[mem], new[non]) >= M.auc(old[mem], old[non]) - 1e-12


def test_refinement_keeps_the_paper_steps_and_order():
    pr_t, pr_r, inside, pop, mem, non, ell = _lr_case(5, n_pop=40, n_eval=200, shift=1.0)
    for gamma in (1.0, 1.5):
        old = rmia_scores(pr_t, pr_r, inside, pop, gamma=gamma, continuous=False)
        new = rmia_scores(pr_t, pr_r, inside, pop, gamma=gamma)
        # within its step, k / n to (k + 1) / n; an audited sample's is a mean over P - 1 population samples
        assert np.all(new >= old - 1e-12) and np.all(new <= old + 1.0 / (pop.size - 1) + 1e-12)
        ev = np.r_[mem, non]
        order = np.argsort(ell[ev])
        assert np.all(np.diff(new[ev][order]) > 0)  # strictly increasing in LR(x): no ties left
        assert np.all(np.diff(old[ev][order]) >= 0)  # the paper's fraction is a coarsening of the same order
        assert np.unique(old[ev]).size <= pop.size + 1


def test_offline_and_population_self_exclusion():
    pr_t, pr_r, inside, pop, mem, non, ell = _lr_case(3, n_pop=10, n_eval=30)
    new = rmia_scores(pr_t, pr_r, inside, pop, gamma=1.0, a=0.5)
    old = rmia_scores(pr_t, pr_r, inside, pop, gamma=1.0, a=0.5, continuous=False)
    assert np.isfinite(new).all() and np.all(new >= old - 1e-12)
    # a population sample is compared with the other n - 1 population samples only
    assert np.all(old[pop] * (pop.size - 1) == np.round(old[pop] * (pop.size - 1)))


@pytest.mark.parametrize("log_spread", [1e-3, 1e-2, 0.3])
@pytest.mark.parametrize("gamma", [1.0, 1.1, 2.0])
def test_no_signal_reads_as_chance_on_calibration(log_spread, gamma):
    """Calibration members against the population (the calibration non-members), no membership signal: the score
    must not separate them. It did when the log-LR spread was small beside log gamma (mean calibration AUC 0.001
    at spread 1e-3, gamma 1.1: flipped on calibration, RMIA then headed audits at chance on evaluation)."""
    rng = np.random.default_rng(7)
    aucs, evals = [], []
    for _ in range(150):
        n = 64
        pr_t = np.exp(log_spread * rng.standard_normal(n) - 1.0)
        pr_r = np.exp(log_spread * rng.standard_normal((4, n)) - 1.0)
        pop, cal_mem, ev_mem, ev_non = np.arange(16), np.arange(16, 32), np.arange(32, 48), np.arange(48, 64)
        s = rmia_scores(pr_t, pr_r, np.zeros((4, n), dtype=bool), pop, gamma)
        aucs.append(M.auc(s[cal_mem], s[pop]))
        evals.append(M.auc(s[ev_mem], s[ev_non]))
    se = 0.5 / np.sqrt(len(aucs))  # an AUC of 16 / 16 has SD below 0.1; 150 draws: SE below 0.01
    assert abs(np.mean(aucs) - 0.5) < 4 * se and abs(np.mean(evals) - 0.5) < 4 * se
