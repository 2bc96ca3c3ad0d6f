"""The verdict end to end: null calibration over many seeds, a leaking target, the 16 / 8 case, warnings."""

import numpy as np
import pytest
import torch

from smplora_plugin.audit import AuditError, run_audit
from smplora_plugin.audit import stats as S
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool
from smplora_plugin.audit.verdict import LEAKS, NO_EVIDENCE, TOO_FEW

from _helpers import TINY_AUDIT, one_thread  # noqa: F401  (one_thread: an autouse fixture)

CFG = TINY_AUDIT


def _null_audit(seed, n_side=24, side=4, **kw):
    pool = synthetic_pool(2 * n_side, (1, side, side), seed=seed)
    mem, non = pool[:n_side], pool[n_side:]
    return run_audit(MemorizingTarget(mem, strength=0.0), mem, non, config={**CFG, "seed": seed}, progress=False, **kw)


@pytest.mark.slow
def test_null_calibration_false_alarms_and_uniform_pvalues():
    """No membership signal, 40 seeds of the whole default suite: 'leaks' in <= 7.5%, p-values ~ uniform."""
    verdicts, p_head, p_env = [], [], []
    for seed in range(40):
        v = _null_audit(seed).verdict
        verdicts.append(v["verdict"])
        p_head.append(v["p_values"]["headline"])
        p_env.append(v["p_values"]["upper_envelope_auc"])
    assert verdicts.count(LEAKS) <= 3, verdicts  # 3 / 40 = 7.5%
    assert set(verdicts) <= {LEAKS, NO_EVIDENCE, TOO_FEW}
    # KS distance from uniform; the 1% critical value for n = 40 is 0.26 (loose: p-values are discrete)
    assert S.ks_uniform_distance(p_head) < 0.26, sorted(p_head)
    assert S.ks_uniform_distance(p_env) < 0.26, sorted(p_env)


def test_memorising_target_leaks():
    pool = synthetic_pool(48, (1, 4, 4), seed=3)
    mem, non = pool[:24], pool[24:]
    rep = run_audit(MemorizingTarget(mem, strength=1.0), mem, non, config=CFG, progress=False)
    v = rep.verdict
    assert v["verdict"] == LEAKS
    assert v["headline"]["p_value"] < 0.025 and v["upper_envelope"]["auc"]["p_value"] < 0.025
    assert v["epsilon_lower_bound"]["epsilon"] > 0
    assert rep.markdown().splitlines()[2] == "**Verdict: leaks.**"


def test_untouched_model_at_16_members_8_nonmembers_is_too_few_to_tell():
    """The issue's case: an evaluation of 16 members / 8 non-members on a model that saw nothing."""
    pool = synthetic_pool(48, (1, 4, 4), seed=11)
    mem, non = pool[:32], pool[32:]
    rep = run_audit(MemorizingTarget(mem, strength=0.0), mem, non, config=CFG, progress=False)
    assert rep.splits["member_eval"] == 16 and rep.splits["nonmember_eval"] == 8
    assert rep.verdict["verdict"] == TOO_FEW
    assert rep.verdict["power"]["smallest_detectable_auc"] > 0.75


def test_headline_is_chosen_on_calibration_and_the_envelope_is_labelled():
    rep = _null_audit(5)
    v = rep.verdict
    model = {k: r for k, r in rep.attacks.items() if r["uses_model"]}
    cal = {k: r["calibration"]["calibration_auc"] for k, r in model.items()}
    assert v["headline"]["attack"] == max(cal, key=cal.get)
    assert v["headline"]["auc"] == rep.attacks[v["headline"]["attack"]]["auc"]
    assert all("calibration_auc_oof" not in r["calibration"] for r in rep.attacks.values())
    env = v["upper_envelope"]
    assert env["auc"]["value"] == max(r["auc"] for r in model.values())
    assert env["n_permutations"] == 1000 and 0 < env["auc"]["p_value"] <= 1
    assert "upper envelope" in rep.max_over_attacks["label"]
    d = rep.to_dict()
    assert list(d)[:4] == ["format", "smplora_version", "title", "verdict"]
    assert d["attacks"]["loss"]["low_fpr"]["1%"]["tpr"] is None  # 12 non-members cannot resolve 1% FPR


def test_blind_baseline_warning_on_a_planted_shift():
    """Members carry a high-contrast texture, non-members do not: the blind baseline must flag it."""
    g = torch.Generator().manual_seed(0)
    mem = (torch.rand((40, 1, 4, 4), generator=g) * 0.4 - 0.2) + torch.tensor([[0.7, -0.7] * 2, [-0.7, 0.7] * 2] * 2)
    non = torch.rand((40, 1, 4, 4), generator=g) * 0.4 - 0.2
    rep = run_audit(MemorizingTarget(mem, strength=0.0), mem.clamp(-1, 1), non,
                    attacks=["loss", "loss_calibrated", "blind"], config=CFG, progress=False)
    assert rep.attacks["blind"]["auc_ci95"][0] > 0.5
    assert any("blind baseline" in w for w in rep.verdict["warnings"])
    assert "WARNING" in rep.markdown()
    # the base model finds the textured members harder: raw loss separates, the calibrated loss cannot
    sh = rep.verdict["shift_check"]
    assert sh["loss_calibrated_auc"] == 0.5 and sh["warning"] is not None


def test_permutations_and_threads_are_checked_before_work():
    with pytest.raises(AuditError, match="at least 1000"):
        _null_audit(0, n_permutations=100)
    with pytest.raises(AuditError, match="num_threads"):
        _null_audit(0, num_threads=0)


def test_default_threads_is_one_and_restored(monkeypatch):
    seen = []
    real = torch.set_num_threads
    real(2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    _null_audit(1)
    assert seen == [1, 2] and torch.get_num_threads() == 2  # 1 during the audit, restored after


def test_verdict_is_repeatable():
    a, b = _null_audit(7).verdict, _null_audit(7).verdict
    assert a["p_values"] == b["p_values"] and a["upper_envelope"] == b["upper_envelope"]
    assert np.isfinite(a["epsilon_lower_bound"]["epsilon"])
