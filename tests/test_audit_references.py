"""LiRA (online / offline) and RMIA with reference models: known answers, hand-checked maths, matching, errors."""

import math

import numpy as np
import pytest
import torch

from smplora_plugin.audit import AuditError, AuditSamples, References, run_audit
from smplora_plugin.audit.attacks.lira import fit_gaussians, lira_offline_terms, lira_online_terms, lira_statistic
from smplora_plugin.audit.attacks.rmia import rmia_probabilities, rmia_scores
from smplora_plugin.audit.references import balanced_halves, match
from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool

CFG = {"n_boot": 200, "draws": 2, "timesteps": [50, 150, 300, 500], "batch_size": 200}
REF_ATTACKS = ["lira_online", "lira_offline", "rmia"]


def _trainer(strength):
    return lambda train, seed: MemorizingTarget(train.images, strength=strength)


def _audit(target, pool, refs, attacks=REF_ATTACKS + ["loss"], **kw):
    mem, non = AuditSamples(pool[:64]), AuditSamples(pool[64:128])
    return run_audit(target, mem, non, attacks=attacks, references=refs, config=CFG, progress=False,
                     num_threads=1, **kw)


@pytest.fixture(scope="module")
def pool():
    return synthetic_pool(192, seed=3)


def test_reference_attacks_expose_a_partial_memoriser(pool):
    strength = 0.3
    refs = References.train(_trainer(strength), AuditSamples(pool[:128]), 8, seed=0)
    rep = _audit(MemorizingTarget(pool[:64], strength=strength), pool, refs)
    for name in REF_ATTACKS:
        assert rep.attacks[name]["auc"] >= 0.9, (name, rep.attacks[name]["auc"])
        assert rep.attacks[name]["auc_ci95"][0] > 0.7
    assert rep.attacks["rmia"]["calibration"]["variant"] == "online"
    assert rep.info["references"]["mode"] == "online" and rep.info["references"]["count"] == 8
    assert rep.info["references"]["in_per_sample_min_mean_max"] == [4, 4.0, 4]  # balanced halves


def test_reference_attacks_at_chance_without_signal(pool):
    # the target memorised other images (not one audited sample); references are informative
    refs = References.train(_trainer(1.0), AuditSamples(pool[:128]), 8, seed=1)
    rep = _audit(MemorizingTarget(pool[128:], strength=1.0), pool, refs)
    for name in REF_ATTACKS:
        lo, hi = rep.attacks[name]["auc_ci95"]
        assert lo <= 0.5 <= hi, (name, rep.attacks[name]["auc"], (lo, hi))


def test_offline_when_audited_samples_are_outside_the_pool(pool):
    # references trained on population data that excludes the audited samples: offline only
    refs = References.train(_trainer(0.3), AuditSamples(pool[128:]), 4, seed=2)
    rep = _audit(MemorizingTarget(pool[:64], strength=0.3), pool, refs, attacks=None)
    assert rep.info["references"]["mode"] == "offline"
    assert "lira_online" not in rep.attacks and {"lira_offline", "rmia"} <= set(rep.attacks)
    assert rep.attacks["lira_offline"]["auc"] >= 0.9
    assert rep.attacks["lira_offline"]["calibration"]["pooled_variance_out"] is False  # 4 OUT refs per sample
    with pytest.raises(AuditError, match="needs online references"):
        _audit(MemorizingTarget(pool[:64], strength=0.3), pool, refs, attacks=["lira_online"])
    refs.mode = "online"
    with pytest.raises(AuditError, match="in no reference's training set"):
        _audit(MemorizingTarget(pool[:64], strength=0.3), pool, refs)


def test_default_suite_without_references_skips_them_and_explicit_request_fails(pool):
    from smplora_plugin.audit.attacks import DEFAULT_ATTACKS, resolve_attacks
    from smplora_plugin.audit.references import REFERENCE_ATTACKS, select_attacks

    default = resolve_attacks(None, has_captions=False, load_plugins=False)
    assert [a.name for a in select_attacks(default, True, None)] == [a.name for a in default]
    assert not set(REFERENCE_ATTACKS) & set(DEFAULT_ATTACKS)
    mem, non = AuditSamples(pool[:32]), AuditSamples(pool[32:64])
    target = MemorizingTarget(pool[:32], strength=0.0)
    for name in REF_ATTACKS:
        with pytest.raises(AuditError, match="needs reference models"):
            run_audit(target, mem, non, attacks=[name], config=CFG, progress=False)


def test_gaussian_fits_by_hand():
    # one sample, one timestep, 8 references (4 IN: 1, 2, 3, 6; 4 OUT: 10, 12, 14, 16)
    vals = np.array([1.0, 2.0, 3.0, 6.0, 10.0, 12.0, 14.0, 16.0])
    ref = vals[:, None, None]  # (R=8, N=1, K=1)
    inside = np.array([True] * 4 + [False] * 4)[:, None]
    mu_in, var_in = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # 14/3
    mu_out, var_out = 13.0, (9 + 1 + 1 + 9) / 3  # 20/3
    mu, var, pooled = fit_gaussians(ref, inside)
    assert not pooled and mu[0, 0] == pytest.approx(mu_in) and var[0, 0] == pytest.approx(var_in)
    x = np.array([[4.0]])
    lnorm = lambda x, m, v: -0.5 * math.log(2 * math.pi * v) - (x - m) ** 2 / (2 * v)  # noqa: E731
    terms, flags = lira_online_terms(x, ref, inside)
    assert terms[0, 0] == pytest.approx(lnorm(4.0, mu_in, var_in) - lnorm(4.0, mu_out, var_out))
    assert flags == {"pooled_variance_in": False, "pooled_variance_out": False}
    z, _ = lira_offline_terms(x, ref, inside)
    assert z[0, 0] == pytest.approx((mu_out - 4.0) / math.sqrt(var_out))


def test_pooled_variance_below_min_count_by_hand():
    # two samples, 4 references; sample 0 IN refs {0, 1}, sample 1 IN refs {2, 3}
    ref = np.array([[1.0, 5.0], [3.0, 6.0], [7.0, 2.0], [9.0, 2.0]])[:, :, None]  # (R=4, N=2, K=1)
    inside = np.array([[True, False], [True, False], [False, True], [False, True]])
    mu, var, pooled = fit_gaussians(ref, inside)  # 2 IN per sample < 4: pooled variance
    assert pooled
    assert mu[:, 0] == pytest.approx([2.0, 2.0])
    # residuals: sample 0 (1-2)^2 + (3-2)^2 = 2; sample 1: 0; dof (2-1) + (2-1) = 2
    assert var[:, 0] == pytest.approx([1.0, 1.0])
    mu_o, var_o, _ = fit_gaussians(ref, ~inside)  # OUT: sample 0 {7, 9}, sample 1 {5, 6}
    assert mu_o[:, 0] == pytest.approx([8.0, 5.5]) and var_o[:, 0] == pytest.approx([(2 + 0.5) / 2] * 2)
    # one reference per sample on a side (no within-sample spread): the spread across samples
    one = np.array([[True, False, True], [False, True, False]])
    mu1, var1, pooled1 = fit_gaussians(np.array([[1.0, 0.0, 5.0], [0.0, 3.0, 0.0]])[:, :, None], one)
    assert pooled1 and mu1[:, 0] == pytest.approx([1.0, 3.0, 5.0]) and var1[:, 0] == pytest.approx([4.0] * 3)


def test_lira_statistic_is_log_mean_over_draws():
    grid = np.array([[[0.1, 0.3], [2.0, 4.0]]])  # (N=1, K=2, M=2)
    assert lira_statistic(grid) == pytest.approx(np.log([[0.2, 3.0]]))


def test_rmia_by_hand():
    # Pr from losses: scale = population mean per timestep; Pr = exp(-mean_t L_t / scale_t)
    grid = np.array([[[1.0]], [[2.0]], [[3.0]]])  # (N=3, K=1, M=1)
    refs = np.array([[[[2.0]], [[2.0]], [[2.0]]], [[[4.0]], [[2.0]], [[3.0]]]])  # (R=2, N=3, K=1, M=1)
    pop = np.array([1, 2])  # scale = 2.5
    pt, pr = rmia_probabilities(grid, refs, pop)
    assert pt == pytest.approx(np.exp(-np.array([1.0, 2.0, 3.0]) / 2.5))
    assert pr == pytest.approx(np.exp(-np.array([[2.0, 2.0, 2.0], [4.0, 2.0, 3.0]]) / 2.5))
    inside = np.zeros((2, 3), dtype=bool)
    s = rmia_scores(pt, pr, inside, pop, gamma=1.0, continuous=False)  # online: Pr(x) = mean over references
    lr = pt / pr.mean(0)
    expect = [np.mean(lr[0] > lr[pop]), float(lr[1] > lr[2]), float(lr[2] > lr[1])]  # z != x
    assert s == pytest.approx(expect)
    inside[1, 0] = True  # sample 0 was in reference 1: offline uses reference 0 only
    s_off = rmia_scores(pt, pr, inside, pop, gamma=1.0, a=0.5, continuous=False)
    px = 0.5 * (1.5 * np.array([pr[0, 0], pr.mean(0)[1], pr.mean(0)[2]]) + 0.5)
    lr = pt / px
    assert s_off == pytest.approx([np.mean(lr[0] > lr[pop]), float(lr[1] > lr[2]), float(lr[2] > lr[1])])


def test_balanced_halves():
    keep = balanced_halves(50, 6, seed=4)
    assert keep.shape == (6, 50) and (keep.sum(0) == 3).all()
    assert (keep == balanced_halves(50, 6, seed=4)).all() and not (keep == balanced_halves(50, 6, seed=5)).all()


def test_identities_match_by_explicit_ids_and_by_pixels(pool):
    target = MemorizingTarget(pool[:4], strength=0.0)
    samples = AuditSamples(pool[:4], ids=["a", "b", "c", "d"])
    pixel_ids = AuditSamples(pool[:4]).identity()
    refs = References.from_targets([(target, ["a", "zzz"]), (target, [pixel_ids[1], pixel_ids[2]]),
                                    (target, ["sha256:" + "0" * 64])])
    view = match(refs, samples)
    assert view.inside.tolist() == [[True, False, False, False], [False, True, True, False],
                                    [False, False, False, False]]
    assert view.mode == "offline"  # sample "d" is IN no reference
    # identical pixels under a different id still count as IN
    view2 = match(refs, AuditSamples(pool[1:2], ids=["renamed"]))
    assert view2.inside[:, 0].tolist() == [False, True, False]


def test_bad_references(pool):
    target = MemorizingTarget(pool[:64], strength=0.3)
    ids = AuditSamples(pool[:128]).identity()
    with pytest.raises(AuditError, match="at least 2"):
        References.from_targets([(target, ids[:64])])
    with pytest.raises(AuditError, match="at least 2"):
        References.train(_trainer(0.3), AuditSamples(pool[:128]), 1, seed=0)
    with pytest.raises(AuditError, match="mode"):
        References.from_targets([(target, ids[:64]), (target, ids[64:])], mode="sideways")
    with pytest.raises(AuditError, match="list of ids"):
        References.from_targets([(target, "abc"), (target, ids[64:])])
    with pytest.raises(AuditError, match="References"):
        _audit(target, pool, [(target, ids[:64])])
    other_schedule = MemorizingTarget(pool[:64], strength=0.3, num_train_timesteps=500)
    with pytest.raises(AuditError, match="noise schedule"):
        _audit(target, pool, References.from_targets([(other_schedule, ids[:64]), (target, ids[64:])]))

    class Shifted(MemorizingTarget):
        def encode(self, images):
            return images.float() + 0.5

    with pytest.raises(AuditError, match="encodes images differently"):
        _audit(target, pool, References.from_targets([(Shifted(pool[:64]), ids[:64]), (target, ids[64:])]))


def test_bad_references_write_nothing(pool, tmp_path):
    target = MemorizingTarget(pool[:64], strength=0.3)
    ids = AuditSamples(pool[:128]).identity()
    refs = References.from_targets([(target, ids), (target, ids)], mode="offline")  # every sample IN both
    with pytest.raises(AuditError, match="in every reference"):
        _audit(target, pool, refs, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reference_grid_uses_the_targets_draws(pool):
    # a reference identical to the target gives exactly the target's loss grid (common random numbers)
    from smplora_plugin.audit import AuditConfig, ScoreContext
    from smplora_plugin.audit.references import ReferenceView

    target = MemorizingTarget(pool[:8], strength=0.5)
    ctx = ScoreContext(target, pool[:16], None, AuditConfig(**{**CFG, "draws": 3}), progress=False)
    refs = References.from_targets([(MemorizingTarget(pool[:8], strength=0.5), []), (target, [])])
    ctx.references = ReferenceView(refs, np.zeros((2, 16), dtype=bool), "offline")
    np.testing.assert_array_equal(ctx.reference_grid(0), ctx.loss_grid(True))
    assert ctx.reference_grids().shape == (2, 16, len(ctx.timesteps), 3)
    torch.testing.assert_close(torch.as_tensor(ctx.reference_grid(1)), torch.as_tensor(ctx.loss_grid(True)))
