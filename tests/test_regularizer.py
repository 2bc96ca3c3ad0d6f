"""PrivacyRegularizer: objective values and gradients, separation of the two players, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin import PrivacyConfig, PrivacyRegularizer, loss_maps

from _helpers import TinyDenoiser, batch, small_reg


def _reference_ce(reg, feats):
    """CE on label 1 computed by hand from the attacker's weights (eval mode, no dropout)."""
    h = feats.reshape(feats.shape[0], -1)
    layers = [(layer.weight.detach(), layer.bias.detach()) for layer in reg.attacker.layers]
    for w, b in layers[:-1]:
        h = torch.clamp(h @ w.T + b, min=0)
    w, b = layers[-1]
    z = h @ w.T + b
    log_p1 = z[:, 1] - torch.log(torch.exp(z[:, 0]) + torch.exp(z[:, 1]))
    return -log_p1.mean()


@pytest.mark.parametrize("objective", ["smp", "mp"])
def test_objective_value_and_gradient_match_hand_computation(objective):
    model = TinyDenoiser()
    reg = small_reg(objective=objective, alpha=0.7, beta=1.3, delta=1e-5, k_steps=1)
    x, noise = batch(6, seed=1)
    xn, noisen = batch(5, seed=2)
    pred = model(x + noise)
    loss = F.mse_loss(pred, noise)
    member = reg.features(pred, noise)
    with torch.no_grad():
        nonmember = reg.features(model(xn + noisen), noisen)
    out = reg.step(loss, member, nonmember)
    grads = torch.autograd.grad(out, list(model.parameters()))

    # reference: the same forward, the attacker weights after the update, the formula by hand
    pred_ref = model(x + noise)
    loss_ref = ((pred_ref - noise) ** 2).mean()
    maps = F.adaptive_avg_pool2d((pred_ref - noise) ** 2, (4, 4))
    ce = _reference_ce(reg, maps)
    if objective == "smp":
        ref = loss_ref / (1.3 + 0.7 * ce + 1e-5)
    else:
        ref = loss_ref - 0.7 * ce
    grads_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6)
    m = reg.metrics()
    assert m["attacker_ce_member"] == pytest.approx(ce.item(), rel=1e-5)
    assert m["adaptation_loss"] == pytest.approx(loss_ref.item(), rel=1e-6)
    if objective == "smp":
        assert m["denominator"] == pytest.approx(1.3 + 0.7 * ce.item() + 1e-5, rel=1e-5)


def test_attacker_gets_no_gradient_from_model_loss_and_model_none_from_attacker():
    model = TinyDenoiser()
    reg = small_reg(k_steps=2)
    x, noise = batch(4, seed=1)
    xn, noisen = batch(4, seed=2)
    pred = model(x + noise)
    loss = F.mse_loss(pred, noise)
    with torch.no_grad():
        nonmember = reg.features(model(xn + noisen), noisen)
    out = reg.step(loss, reg.features(pred, noise), nonmember)
    # the attacker update inside step() must not have touched the model's gradients
    assert all(p.grad is None for p in model.parameters())
    before = {k: v.clone() for k, v in reg.attacker.state_dict().items()}
    for p in reg.attacker.parameters():
        p.grad = None
    out.backward()
    assert all(p.grad is None for p in reg.attacker.parameters()), "the LoRA loss leaked gradient into the attacker"
    assert all(p.grad is not None for p in model.parameters())
    for k, v in reg.attacker.state_dict().items():
        assert torch.equal(v, before[k])


def test_attacker_updates_k_steps_and_zero_k_freezes_it():
    reg = small_reg(k_steps=3)
    m, n = torch.rand(4, 2, 4, 4), torch.rand(4, 2, 4, 4) + 1
    reg.update_attacker(m, n)
    assert reg.attacker_steps == 3 and reg.attacker_updates == 1
    frozen = small_reg(k_steps=0)
    loss = torch.tensor(1.0, requires_grad=True)
    out = frozen.step(loss, m.requires_grad_(), None)
    w0 = {k: v.clone() for k, v in frozen.attacker.state_dict().items()}
    frozen.step(loss, m, n)
    assert frozen.attacker_steps == 0
    assert all(torch.equal(v, w0[k]) for k, v in frozen.attacker.state_dict().items())
    assert out.requires_grad


def test_update_attacker_false_skips_update_and_needs_no_nonmembers():
    reg = small_reg()
    m = torch.rand(3, 2, 4, 4, requires_grad=True)
    reg.step(torch.tensor(2.0, requires_grad=True), m, None, update_attacker=False)
    assert reg.attacker_updates == 0 and reg.global_step == 1


def test_unbalanced_batches_are_weighted_equally():
    """The update on (1 member, 7 non-members) equals the one on the same rows balanced by repetition."""
    m = torch.rand(1, 2, 4, 4)
    n = torch.rand(7, 2, 4, 4)
    a, b = small_reg(dropout=0.0), small_reg(dropout=0.0)
    a.update_attacker(m, n)
    b.update_attacker(m.repeat(7, 1, 1, 1), n)
    for va, vb in zip(a.attacker.state_dict().values(), b.attacker.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_under_autocast_run_attacker_in_fp32(dtype):
    model = TinyDenoiser()
    reg = small_reg()
    x, noise = batch(4, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x + noise).to(dtype)
        loss = F.mse_loss(pred.float(), noise)
        member = reg.features(pred, noise.to(dtype))
        nonmember = reg.features(pred.detach() + 0.1, noise.to(dtype))
        out = reg.step(loss, member, nonmember)
    assert member.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in reg.attacker.parameters())
    out.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_maps_pool_any_resolution_down_to_the_grid_and_identity_at_grid():
    pred, target = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)
    maps = loss_maps(pred, target, 64)
    torch.testing.assert_close(maps, (pred - target) ** 2)
    for h, w in [(48, 80), (96, 64), (8, 9)]:
        out = loss_maps(torch.randn(3, 4, h, w), torch.randn(3, 4, h, w), 8)
        assert out.shape == (3, 4, 8, 8)
    reg = small_reg(feature_grid=8)
    reg.update_attacker(torch.rand(2, 4, 48, 80), torch.rand(2, 4, 96, 64))  # buckets of different sizes
    assert reg.attacker.in_features == 4 * 8 * 8


def test_attacker_learns_to_separate_members_of_a_memorising_model():
    """A denoiser overfit on 16 members: the proxy's scores separate fresh member / non-member draws."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(48, 2, 4, 4, generator=g)
    members, nonmembers = data[:16], data[16:32]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def forward(x, gen):
        noise = torch.randn(x.shape, generator=gen)
        pred = model(0.6 * x + 0.8 * noise).reshape(x.shape)
        return pred, noise

    for _ in range(600):  # memorise the members
        pred, noise = forward(members, g)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    reg = PrivacyRegularizer(hidden=(64, 32), feature_grid=4, attacker_lr=1e-3, k_steps=1, seed=0)
    with torch.no_grad():
        for _ in range(300):
            reg.update_attacker(reg.features(*forward(members, g)), reg.features(*forward(nonmembers, g)))
        s_m = reg.scores(reg.features(*forward(members, g)))
        s_n = reg.scores(reg.features(*forward(nonmembers, g)))
    auc = (s_m[:, None] > s_n[None, :]).float().mean().item()
    assert auc > 0.8, auc
    assert reg.metrics()["attacker_acc"] > 0.7


def test_config_object_and_keywords_are_equivalent_and_overrides_apply():
    cfg = PrivacyConfig(alpha=0.3, hidden=(8,), feature_grid=2)
    assert PrivacyRegularizer(cfg).config == PrivacyRegularizer(alpha=0.3, hidden=[8], feature_grid=(2, 2)).config
    assert PrivacyRegularizer(cfg, alpha=2.0).config.alpha == 2.0
    assert PrivacyRegularizer(cfg.to_dict()).config == cfg
    d = PrivacyConfig().to_dict()
    assert (d["alpha"], d["beta"], d["delta"], d["k_steps"], d["hidden"], d["dropout"], d["attacker_lr"],
            d["attacker_weight_decay"]) == (0.05, 1.0, 1e-5, 1, [512, 256], 0.5, 1e-5, 1e-4)


def test_metrics_are_python_floats():
    reg = small_reg()
    reg.step(torch.tensor(1.0, requires_grad=True), torch.rand(2, 2, 4, 4, requires_grad=True), torch.rand(2, 2, 4, 4))
    m = reg.metrics()
    assert m and all(type(v) is float and math.isfinite(v) for v in m.values())
    for key in ("attacker_ce_member", "attacker_ce_nonmember", "attacker_acc", "denominator", "adaptation_loss",
                "regularized_loss", "step", "attacker_updates", "attacker_steps"):
        assert key in m
    assert reg.progress_postfix() == {"mia_ce": f"{m['attacker_ce_member']:.3f}", "mia_acc": f"{m['attacker_acc']:.2f}"}


def test_nonmember_bank_is_refreshed_every_n_updates():
    reg = small_reg(nonmember_every=3)
    m = lambda: torch.rand(2, 2, 4, 4, requires_grad=True)  # noqa: E731
    pattern = []
    for _ in range(7):
        want = reg.wants_nonmembers()
        pattern.append(want)
        n = torch.rand(2, 2, 4, 4) if want else None
        reg.step(torch.tensor(1.0, requires_grad=True), m(), n)
    assert pattern == [True, False, False, True, False, False, True]
    assert reg.attacker_updates == 7
    assert not reg.wants_nonmembers(update_attacker=False)
    assert not small_reg(k_steps=0).wants_nonmembers()


def test_calibrated_features_subtract_the_base_models_error_and_require_reference():
    from smplora_plugin import FeatureError

    pred = torch.randn(2, 2, 4, 4, requires_grad=True)
    base, target = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    reg = small_reg(calibrated=True)
    feats = reg.features(pred, target, reference=base)
    torch.testing.assert_close(feats, ((pred - target) ** 2 - (base - target) ** 2).reshape(2, -1))
    feats.sum().backward()
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach())  # no gradient through the reference
    with pytest.raises(FeatureError, match="reference="):
        reg.features(pred, target)
    with pytest.raises(FeatureError, match="calibrated=False"):
        small_reg().features(pred, target, reference=base)
    with pytest.raises(FeatureError, match="shape of pred"):
        reg.features(pred, target, reference=base[:1])
