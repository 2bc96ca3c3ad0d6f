"""``keep_loss_value``: the trainer's loss display keeps showing the denoising loss, while the gradient
is the regularised loss's, also under gradient scaling (GradScaler) and gradient accumulation."""

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.errors import FeatureError

CFG = dict(alpha=2.0, attacker_lr=1e-2, feature_grid=4, hidden=(16,), nonmember_every=1, seed=3)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(2, 2, 3, padding=1)


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g),
            torch.randn(4, 2, 8, 8, generator=g))


def _run(keep: bool, micro_steps: int, scale: float = 1.0, scaler=None):
    """Gradients of one optimiser step of ``micro_steps`` accumulated micro-batches, and the losses shown."""
    model, reg = _model(), PrivacyRegularizer(**CFG)
    shown = []
    for i in range(micro_steps):
        x, target, x_nm = _batch(i)
        pred = model(x)
        loss = F.mse_loss(pred, target)
        sync = i == micro_steps - 1
        with torch.no_grad():
            nm = reg.features(model(x_nm), target) if sync else None
        out = reg.step(loss, reg.features(pred, target), nm, update_attacker=sync, keep_loss_value=keep)
        out = out / micro_steps
        shown.append((out.item(), loss.item() / micro_steps, reg.metrics()["regularized_loss"] / micro_steps))
        if scaler is not None:
            scaler.scale(out).backward()
        else:
            (out * scale).backward()
    return [p.grad.clone() for p in model.parameters()], shown


def test_value_is_the_denoising_loss_and_gradient_the_regularised_one():
    grads_keep, shown = _run(keep=True, micro_steps=1)
    grads_reg, shown_reg = _run(keep=False, micro_steps=1)
    (value, denoise, regularised), = shown
    assert value == denoise                                        # what the trainer prints, exactly
    assert abs(regularised - denoise) > 0.05 * denoise            # the SMP ratio differs visibly ...
    assert shown_reg[0][0] == pytest.approx(regularised, rel=1e-6)   # ... and is what step() used to return
    for a, b in zip(grads_keep, grads_reg):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the gradient is not the plain loss's
    model = _model()
    x, target, _ = _batch(0)
    F.mse_loss(model(x), target).backward()
    assert not all(torch.allclose(p.grad, g, rtol=1e-3) for p, g in zip(model.parameters(), grads_keep))


def test_gradient_accumulation_gives_the_regularised_gradients():
    grads_keep, shown = _run(keep=True, micro_steps=3)
    grads_reg, _ = _run(keep=False, micro_steps=3)
    for value, denoise, _ in shown:
        assert value == pytest.approx(denoise, rel=1e-6)   # (divided by the micro-steps in float32)
    for a, b in zip(grads_keep, grads_reg):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_scaled_gradients_match_the_regularised_ones():
    # torch.cuda.amp.GradScaler multiplies the loss by its scale before backward: linear, so checked on CPU
    grads_keep, _ = _run(keep=True, micro_steps=2, scale=1024.0)
    grads_reg, _ = _run(keep=False, micro_steps=2, scale=1024.0)
    for a, b in zip(grads_keep, grads_reg):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    scaler_keep = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler_reg = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    grads_keep, _ = _run(keep=True, micro_steps=2, scaler=scaler_keep)
    grads_reg, _ = _run(keep=False, micro_steps=2, scaler=scaler_reg)
    for a, b in zip(grads_keep, grads_reg):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    unscaled, _ = _run(keep=False, micro_steps=2)
    for a, b in zip(grads_keep, unscaled):
        assert torch.allclose(a / 2.0 ** 12, b, rtol=1e-5, atol=1e-7)


def test_keep_loss_value_checks_its_inputs():
    with pytest.raises(FeatureError, match="shape"):
        PrivacyRegularizer.keep_loss_value(torch.ones(()), torch.ones(2))
    with pytest.raises(FeatureError, match="two tensors"):
        PrivacyRegularizer.keep_loss_value(torch.ones(()), 1.0)
