"""SMP-LoRA / MP-LoRA with DP noise: what is clipped (each sample's own objective), against PrivacyRegularizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin.dp import DPError, DPGradients, smp_sample_loss

from _helpers import TinyDenoiser, batch, one_thread, small_reg  # noqa: F401


def _sample_loss(reg):
    def fn(model, x, noise):
        pred = model(x + noise)
        return smp_sample_loss(reg, F.mse_loss(pred, noise), reg.features(pred, noise))
    return fn


def _ready(objective, **kw):
    """A denoiser and a regulariser whose attacker has had one update (then stays frozen)."""
    model = TinyDenoiser(seed=2)
    reg = small_reg(objective=objective, alpha=0.7, beta=1.3, **kw)
    x, noise = batch(6, seed=1)
    xn, nn_ = batch(6, seed=2)
    with torch.no_grad():
        reg.update_attacker(reg.features(model(x + noise), noise), reg.features(model(xn + nn_), nn_))
    return model, reg, x, noise


def _dp(model, **kw):
    args = dict(noise_multiplier=1.0, max_grad_norm=1e6, dataset_size=60, expected_batch_size=6,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return DPGradients(model, **args)


def _batch_grad(model, reg, x, noise):
    """The gradient of reg.step's objective on the batch, the attacker frozen (no update)."""
    pred = model(x + noise)
    out = reg.step(F.mse_loss(pred, noise), reg.features(pred, noise), update_attacker=False)
    return torch.autograd.grad(out, list(model.parameters()))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_mp_per_sample_terms_sum_to_the_batch_gradient(method):
    model, reg, x, noise = _ready("mp")
    dp = _dp(model, method=method)                           # the clip is far above every norm: nothing clipped
    dp.accumulate(_sample_loss(reg), x, noise)
    for s, g in zip(dp.clipped_sum, _batch_grad(model, reg, x, noise)):
        torch.testing.assert_close(s / 6, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_smp_per_sample_ratio_is_the_batch_objective_for_one_sample(method):
    model, reg, x, noise = _ready("smp")
    for i in range(3):
        dp = _dp(model, method=method)
        dp.accumulate(_sample_loss(reg), x[i:i + 1], noise[i:i + 1])
        for s, g in zip(dp.clipped_sum, _batch_grad(model, reg, x[i:i + 1], noise[i:i + 1])):
            torch.testing.assert_close(s, g, rtol=1e-4, atol=1e-6)


def test_smp_under_dp_trains_the_mean_of_per_sample_ratios_not_the_batch_ratio():
    model, reg, x, noise = _ready("smp")
    dp = _dp(model)
    dp.accumulate(_sample_loss(reg), x, noise)
    # by hand: each sample's ratio l_i / (beta + alpha CE_i + delta), CE_i from reg.member_ce on its own row
    total = 0
    for i in range(6):
        pred = model(x[i:i + 1] + noise[i:i + 1])
        ce = reg.member_ce(reg.features(pred, noise[i:i + 1]))
        total = total + F.mse_loss(pred, noise[i:i + 1]) / (1.3 + 0.7 * ce + reg.config.delta)
    hand = torch.autograd.grad(total, list(model.parameters()))
    for s, h in zip(dp.clipped_sum, hand):
        torch.testing.assert_close(s, h, rtol=1e-4, atol=1e-6)
    batch_ratio = _batch_grad(model, reg, x, noise)
    assert not all(torch.allclose(s / 6, g, rtol=1e-3) for s, g in zip(dp.clipped_sum, batch_ratio))


def test_smp_per_sample_gradients_are_clipped_and_vmap_equals_loop():
    model, reg, x, noise = _ready("smp")
    sums, norms = [], []
    for method in ("vmap", "loop"):
        dp = _dp(model, method=method, max_grad_norm=0.05)
        norms.append(dp.accumulate(_sample_loss(reg), x, noise))
        sums.append(dp.clipped_sum)
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=1e-7)
    assert (norms[0] > 0.05).all()
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.cat([s.flatten() for s in sums[0]]).norm() <= 6 * 0.05 * (1 + 1e-6)


def test_a_short_smp_lora_dp_loop_updates_attacker_and_lora():
    model = TinyDenoiser(seed=2)
    reg = small_reg(alpha=0.7, k_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dp = _dp(model, max_grad_norm=0.5, regularizer=reg)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        x, noise = batch(6, seed=10 + step)
        xn, nn_ = batch(6, seed=20 + step)
        with torch.no_grad():                                   # attacker first, as reg.step does
            reg.update_attacker(reg.features(model(x + noise), noise), reg.features(model(xn + nn_), nn_))
        dp.accumulate(_sample_loss(reg), x, noise)
        opt.zero_grad(set_to_none=True)
        dp.step()
        opt.step()
    assert reg.attacker_updates == 3 and reg.attacker_steps == 6 and dp.steps == 3
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    info = json.loads(dp.file_metadata()["smplora.dp"])
    assert info["objective"] == "smp-lora + dp noise" and "attacker" in info["caveat"]


def test_smp_sample_loss_refuses_what_it_cannot_use():
    model = TinyDenoiser(seed=2)
    reg = small_reg()
    x, noise = batch(2, seed=1)
    pred = model(x + noise)
    feats = reg.features(pred[:1], noise[:1])
    with pytest.raises(DPError, match="no attacker yet: call reg.update_attacker"):
        smp_sample_loss(reg, F.mse_loss(pred[:1], noise[:1]), feats)
    with torch.no_grad():
        reg.update_attacker(reg.features(pred, noise), reg.features(pred, noise))
    with pytest.raises(DPError, match="scalar adaptation loss of one sample"):
        smp_sample_loss(reg, (pred[:1] - noise[:1]) ** 2, feats)
    with pytest.raises(DPError, match="pass reg.features\\(pred, target\\) of the one sample"):
        smp_sample_loss(reg, F.mse_loss(pred, noise), reg.features(pred, noise))


def test_step_per_sample_is_the_mean_of_smp_sample_losses_and_trains_per_sample():
    """The trainers' SMP + DP objective (reg.step_per_sample): its value is the mean of smp_sample_loss over the
    batch, and DPTraining's hooks on the trainer's backward give each sample exactly smp_sample_loss's gradient."""
    from smplora_plugin.dp import DPTraining, GradSampleHooks, dp_options

    from _helpers import small_reg
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1))
    x, noise = batch(4, seed=1)
    xn, noisen = batch(4, seed=2)
    reg = small_reg(k_steps=1)
    hooks = GradSampleHooks(model, list(model.parameters())).attach()
    pred = model(x + noise)
    losses = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    with torch.no_grad():
        nonmember = reg.features(model(xn + noisen), noisen)
    out = reg.step_per_sample(losses, reg.features(pred, noise), nonmember, keep_loss_value=True)
    assert out.item() == pytest.approx(losses.mean().item(), rel=1e-6)       # the trainer's loss value is kept
    out.backward()
    got = hooks.take()
    hooks.detach()
    for i in range(4):
        model.zero_grad()
        p_i = model(x[i:i + 1] + noise[i:i + 1])
        smp_sample_loss(reg, F.mse_loss(p_i, noise[i:i + 1]), reg.features(p_i, noise[i:i + 1])).backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6)
    dpt = DPTraining(model, dp_options("smplora", noise_multiplier=1.0), dataset_size=8, batch_size=4,
                     regularizer=reg)
    assert "smp-lora + dp noise" in dpt.summary()


def test_step_per_sample_refuses_rows_without_features():
    from _helpers import small_reg
    reg = small_reg(k_steps=0)
    x, noise = batch(3, seed=1)
    with pytest.raises(Exception, match="every sample of the batch needs its features"):
        reg.step_per_sample(torch.ones(3), reg.features(x[:2], noise[:2]))
