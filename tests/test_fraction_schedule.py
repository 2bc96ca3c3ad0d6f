"""``privacy_fraction`` taken over steps: a deterministic schedule of privacy rows per step (no random
draw), ``reg.step(loss, None)`` on a step without any, and an exact resume in the middle of the schedule."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin import PrivacyConfig, PrivacyRegularizer
from smplora_plugin.errors import FeatureError


def reg_(**kw) -> PrivacyRegularizer:
    kw = {"feature_grid": 2, "hidden": (8,), "attacker_lr": 1e-2, "nonmember_every": 2, **kw}
    return PrivacyRegularizer(PrivacyConfig(**kw), load_entry_points=False)


@pytest.mark.parametrize("fraction, batch, first", [
    (0.25, 1, [1, 0, 0, 0, 1, 0, 0, 0]),
    (0.25, 2, [1, 0, 1, 0, 1, 0, 1, 0]),
    (0.25, 4, [1] * 8),
    (0.25, 6, [2, 1, 2, 1, 2, 1, 2, 1]),
    (0.5, 3, [2, 1, 2, 1, 2, 1, 2, 1]),
    (1.0, 3, [3] * 8),
])
def test_rows_per_step(fraction, batch, first):
    cfg = PrivacyConfig(privacy_fraction=fraction)
    assert [cfg.privacy_rows(batch, k) for k in range(8)] == first
    assert cfg.nonmember_rows(batch) == first[0] == max(1, math.ceil(fraction * batch))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1 / 3, 0.3, 0.7])
@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_rows_add_up_exactly_to_the_fraction_of_the_samples(fraction, batch):
    cfg = PrivacyConfig(privacy_fraction=fraction)
    share = cfg._fraction() * batch
    total = 0
    for k in range(1, 2001):
        rows = cfg.privacy_rows(batch, k - 1)
        assert 0 <= rows <= batch
        total += rows
        assert total == math.ceil(share * k)   # exact: no rounding drift over a long run


def test_schedule_draws_no_random_numbers_and_follows_the_step_counter():
    torch.manual_seed(3)
    random.seed(3)
    before = (torch.get_rng_state(), random.getstate())
    reg = reg_(privacy_fraction=0.25)
    rows = []
    for _ in range(6):
        rows.append(reg.privacy_rows(1))
        assert reg.privacy_rows(1) == rows[-1]            # asking twice in a step gives the same answer
        reg.global_step += 1
    assert rows == [1, 0, 0, 0, 1, 0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_step_is_refused(bad):
    with pytest.raises(ValueError, match="step"):
        PrivacyConfig().privacy_rows(4, bad)


def _batch(g, n=1):
    pred = torch.randn(n, 4, 4, 4, generator=g).requires_grad_(True)
    return pred, torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)


@pytest.mark.parametrize("objective", ["smp", "mp"])
def test_a_step_without_rows_keeps_the_last_denominator_and_changes_nothing_else(objective):
    g = torch.Generator().manual_seed(0)
    reg = reg_(privacy_fraction=0.25, objective=objective, alpha=2.0)
    pred, target, nm = _batch(g)
    with pytest.raises(FeatureError, match="first step"):
        reg.step(F.mse_loss(pred, target), None)
    assert reg.global_step == 0
    reg.step(F.mse_loss(pred, target), reg.features(pred, target), reg.features(nm.detach(), target))
    ce, weights = reg.metrics()["attacker_ce_member"], [p.detach().clone() for p in reg.attacker.parameters()]
    updates, bank = reg.attacker_updates, reg._bank.clone()
    pred, target, nm = _batch(g)
    assert reg.privacy_rows(1) == 0
    with pytest.raises(FeatureError, match="without member_feats"):
        reg.step(F.mse_loss(pred, target), None, reg.features(nm.detach(), target))
    loss = F.mse_loss(pred, target)
    out = reg.step(loss, None)
    grad, = torch.autograd.grad(out, pred, retain_graph=True)
    plain, = torch.autograd.grad(loss, pred)
    scale = 1.0 / (1.0 + 2.0 * ce + 1e-5) if objective == "smp" else 1.0
    assert torch.allclose(grad, plain * scale, rtol=1e-5, atol=1e-8)
    assert reg.global_step == 2 and reg.attacker_updates == updates and torch.equal(reg._bank, bank)
    assert all(torch.equal(a, b) for a, b in zip(reg.attacker.parameters(), weights))
    assert reg.metrics()["attacker_ce_member"] == pytest.approx(ce)


def _run(reg, g, steps, log):
    """A batch-1 loop as the shims run it: features and a held-out batch only on steps with privacy rows."""
    for _ in range(steps):
        pred, target, nm = _batch(g)
        loss = F.mse_loss(pred, target)
        n = reg.privacy_rows(1)
        if n == 0:
            out = reg.step(loss, None)
        else:
            held = reg.features(nm, target) if reg.wants_nonmembers() else None
            out = reg.step(loss, reg.features(pred[:n], target[:n]), held)
        log.append((n, float(out.detach())))


def test_resume_in_the_middle_of_the_schedule_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    straight, log_a = reg_(privacy_fraction=0.25), []
    _run(straight, g, 11, log_a)
    g = torch.Generator().manual_seed(1)
    first, log_b = reg_(privacy_fraction=0.25), []
    _run(first, g, 6, log_b)                      # stop at step 6: steps 6 and 7 have no rows, step 8 has one
    first.save(tmp_path / "s.safetensors")
    resumed = PrivacyRegularizer.load(tmp_path / "s.safetensors", load_entry_points=False)
    assert resumed.global_step == 6 and resumed.privacy_rows(1) == 0
    _run(resumed, g, 5, log_b)
    assert log_a == log_b and [n for n, _ in log_a] == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert resumed.attacker_updates == straight.attacker_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(straight.attacker.parameters(), resumed.attacker.parameters()))
    assert straight.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        resumed.optimizer.state_dict()["state"][0]["exp_avg"])


def test_demo_loop_at_batch_one_runs_the_privacy_forwards_on_every_fourth_step():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    from smplora_plugin.demo.data import make_splits
    from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig
    from smplora_plugin.demo.train import train_lora

    class Spy(PrivacyRegularizer):
        calls: list = []

        def features(self, pred, target, timesteps=None, reference=None):
            self.calls.append((self.global_step, pred.shape[0], None if reference is None else reference.shape[0]))
            return super().features(pred, target, timesteps=timesteps, reference=reference)

    s = make_splits({"member": 6, "nonmember_defense": 6}, seed=0)
    model = TinyLDM(TinyLDMConfig(), seed=0)
    model.add_lora(2, seed=0)
    reg = Spy(PrivacyConfig.preset("robust", feature_grid=4, hidden=(8,), nonmember_every=1), load_entry_points=False)
    train_lora(model, s["member"], steps=6, lr=1e-3, batch_size=1, seed=0, reg=reg, nonmembers=s["nonmember_defense"],
               progress=False)
    # steps 0 and 4: member and held-out features, each with its base prediction, on one row; none elsewhere
    assert reg.calls == [(0, 1, 1), (0, 1, 1), (4, 1, 1), (4, 1, 1)]
    assert reg.global_step == 6 and reg.attacker_updates == 2
