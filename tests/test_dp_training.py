"""DPTraining: DP-SGD inside a trainer's own loop (hooks on the LoRA layers, an optimiser pre-hook)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smplora_plugin.dp import DPError, DPGradients, DPTraining, GradSampleHooks, check_mixed_precision, dp_options

pytest.importorskip("opacus")


class LoRALinear(nn.Module):
    """kohya-like: the frozen layer plus lora_up(lora_down(x)), the LoRA layers called as modules."""

    def __init__(self, base: nn.Module, rank: int = 2, conv: bool = False):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        if conv:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, padding=base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = LoRALinear(nn.Conv2d(3, 4, 3, padding=1), conv=True)
        self.fc = LoRALinear(nn.Linear(4 * 4 * 4, 5))
        self.shared = LoRALinear(nn.Linear(5, 5))

    def forward(self, x):
        h = F.gelu(self.conv(x)).flatten(1)
        h = self.fc(h)
        return self.shared(F.gelu(self.shared(h)))      # a LoRA layer called twice in one forward


def lora_params(net):
    return [p for p in net.parameters() if p.requires_grad]


def sample_loss(net, x, y):
    return F.mse_loss(net(x), y)


def data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, generator=g)


def test_hook_per_sample_gradients_equal_one_backward_per_sample():
    net = Net()
    x, y = data()
    hooks = GradSampleHooks(net, lora_params(net)).attach()
    F.mse_loss(net(x), y, reduction="none").mean(1).mean().backward()
    got = hooks.take(1.0, mean_reduced=True)
    assert hooks.take() is None          # taken once
    hooks.detach()
    for i in range(x.shape[0]):
        want = torch.autograd.grad(sample_loss(net, x[i:i + 1], y[i:i + 1]), lora_params(net))
        for g, w in zip(got, want):
            torch.testing.assert_close(g[i], w, rtol=1e-4, atol=1e-6)
    assert hooks.take() is None          # taken once


def test_hooks_skip_no_grad_forwards_and_work_under_checkpointing():
    net = Net()
    x, y = data()
    hooks = GradSampleHooks(net, lora_params(net)).attach()
    with torch.no_grad():
        net(x)                                  # a base / held-out forward: nothing recorded
    assert not hooks.pending
    out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False)
    F.mse_loss(out, y, reduction="none").mean(1).mean().backward()
    got = hooks.take()
    hooks.detach()
    want = torch.autograd.grad(sample_loss(net, x[2:3], y[2:3]), lora_params(net))
    for g, w in zip(got, want):
        torch.testing.assert_close(g[2], w, rtol=1e-4, atol=1e-6)


def test_hooks_refuse_an_unsupported_dp_parameter():
    net = Net()
    extra = nn.Parameter(torch.ones(3))
    net.register_parameter("magnitude", extra)     # a DoRA-like magnitude on a non-leaf module
    with pytest.raises(DPError, match="plain LoRA"):
        GradSampleHooks(net, lora_params(net))


def _trainer_loop(net, dpt, batches, accumulation, lr=0.1):
    """A trainer's loop as kohya / accelerate run it: mean loss / accumulation, backward, step every k."""
    opt = torch.optim.SGD(lora_params(net), lr=lr)
    dpt.attach(opt)
    for i, (x, y) in enumerate(batches):
        dpt.collect()                                             # the shim: before each micro-batch's loss
        loss = F.mse_loss(net(x), y) / accumulation
        loss.backward()
        if (i + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(lora_params(net), 1.0)    # the trainer's own clip: on a discarded grad
            opt.step()
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("capture", ["hooks", "grads"])
def test_trainer_loop_matches_the_reference_mechanism(capture):
    x, y = data(8)
    accumulation = 2
    micro = 2 if capture == "hooks" else 1
    batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, 8, micro)]
    per_step = micro * accumulation
    opts = dp_options("dpsgd", noise_multiplier=0.7, max_grad_norm=0.05, seed=3)
    net = Net()
    dpt = DPTraining(net, opts, dataset_size=8, batch_size=per_step, backward_scale=1 / accumulation, capture=capture)
    _trainer_loop(net, dpt, batches, accumulation)

    ref = Net()
    dp = DPGradients(ref, noise_multiplier=0.7, max_grad_norm=0.05, dataset_size=8, expected_batch_size=per_step,
                     sampling="fixed_batch", generator=torch.Generator().manual_seed(3), method="loop")
    opt = torch.optim.SGD(lora_params(ref), lr=0.1)
    for s in range(0, 8, per_step):
        dp.accumulate(sample_loss, x[s:s + per_step], y[s:s + per_step])
        opt.zero_grad(set_to_none=True)
        dp.step()
        opt.step()
    for a, b in zip(lora_params(net), lora_params(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert dpt.dp.steps == 8 // per_step
    assert dpt.epsilon() > 0 and "fixed-size" in dpt.summary()
    assert set(dpt.metrics()) >= {"smplora/epsilon", "smplora/dp_steps"}


def test_update_is_clipped_sum_plus_noise_of_the_stated_scale():
    """Each LoRA parameter moves by -lr (sum of clipped per-sample grads + sigma C z) / B: with sigma so large that
    the noise dominates, the update's spread is sigma C lr / B."""
    x, y = data(4)
    net = Net()
    before = [p.detach().clone() for p in lora_params(net)]
    opts = dp_options("dpsgd", noise_multiplier=50.0, max_grad_norm=0.1, seed=0)
    dpt = DPTraining(net, opts, dataset_size=4, batch_size=4)
    _trainer_loop(net, dpt, [(x, y)], 1, lr=1.0)
    moved = torch.cat([(b - a.detach()).flatten() for a, b in zip(lora_params(net), before)])
    assert moved.std().item() == pytest.approx(50.0 * 0.1 / 4, rel=0.1)


def test_resume_is_exact():
    x, y = data(8)
    opts = dp_options("dpsgd", noise_multiplier=1.0, max_grad_norm=0.1, seed=5)
    whole = Net()
    _trainer_loop(whole, DPTraining(whole, opts, dataset_size=8, batch_size=2), [(x[i:i + 2], y[i:i + 2])
                                                                                 for i in range(0, 8, 2)], 1)
    first = Net()
    a = DPTraining(first, opts, dataset_size=8, batch_size=2)
    _trainer_loop(first, a, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 4, 2)], 1)
    state = a.state_dict()
    b = DPTraining(first, opts, dataset_size=8, batch_size=2)
    b.load_state_dict(state)
    a.detach()
    _trainer_loop(first, b, [(x[i:i + 2], y[i:i + 2]) for i in range(4, 8, 2)], 1)
    for p, q in zip(lora_params(whole), lora_params(first)):
        torch.testing.assert_close(p, q)
    assert b.dp.steps == 4
    other = DPTraining(Net(), dp_options("dpsgd", noise_multiplier=2.0, max_grad_norm=0.1), dataset_size=8,
                       batch_size=2)
    with pytest.raises(DPError, match="other DP settings"):
        other.load_state_dict(state)


def test_short_batch_is_accepted_and_a_long_one_refused():
    x, y = data(5)
    net = Net()
    dpt = DPTraining(net, dp_options("dpsgd", noise_multiplier=1.0), dataset_size=5, batch_size=2)
    _trainer_loop(net, dpt, [(x[:2], y[:2]), (x[4:5], y[4:5])], 1)       # the last batch of an epoch: 1 image
    assert dpt.dp.steps == 2
    other = Net()
    with pytest.raises(DPError, match="exactly expected_batch_size"):
        _trainer_loop(other, DPTraining(other, dp_options("dpsgd", noise_multiplier=1.0), dataset_size=5,
                                        batch_size=2), [(x[:3], y[:3])], 1)


def test_optimizer_training_a_foreign_parameter_is_refused():
    net = Net()
    dpt = DPTraining(net, dp_options("dpsgd", noise_multiplier=1.0), dataset_size=4, batch_size=2)
    stray = nn.Parameter(torch.zeros(2))
    with pytest.raises(DPError, match="outside the LoRA network"):
        dpt.attach(torch.optim.SGD(lora_params(net) + [stray], lr=0.1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="dpsgd"), "needs a noise level"),
    (dict(method="dpsgd", noise_multiplier=0.0), "noise_multiplier=0.0"),
    (dict(method="dpsgd", noise_multiplier=-1), "must be a finite number > 0"),
    (dict(method="dpsgd", noise_multiplier=1.0, max_grad_norm=0), "max_grad_norm=0"),
    (dict(method="dpsgd", noise_multiplier=1.0, delta=1.5), "outside \\(0, 1\\)"),
    (dict(method="smplora", max_grad_norm=1.0), "without a DP mechanism"),
    (dict(method="robust", delta=1e-5), "without a DP mechanism"),
    (dict(method="dpsgd", noise_multiplier=1.0, target_epsilon=8), "not both"),
    (dict(method="dpsgd", noise_multiplier=1.0, accountant="gdp"), "accountant"),
])
def test_dp_options_bad_input(kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(DPError, match=match):
        dp_options(method, **kwargs)


def test_dp_options_meanings():
    assert dp_options("smplora") is None
    smp = dp_options("smplora", noise_multiplier=0.5)
    assert smp.noise_multiplier == 0.5 and smp.max_grad_norm == 1.0
    assert dp_options("dpsgd", target_epsilon=8.0).target_epsilon == 8.0


def test_unreachable_target_epsilon_and_missing_plan_are_refused():
    with pytest.raises(DPError, match="planned optimiser steps"):
        DPTraining(Net(), dp_options("dpsgd", target_epsilon=8.0), dataset_size=8, batch_size=2)
    with pytest.raises(DPError, match="not reachable"):
        DPTraining(Net(), dp_options("dpsgd", target_epsilon=1e-5), dataset_size=400, batch_size=100,
                   planned_steps=10_000)


def test_fp16_loss_scaling_is_refused():
    check_mixed_precision("bf16")
    check_mixed_precision("no")
    with pytest.raises(DPError, match="bf16"):
        check_mixed_precision("fp16")


@pytest.mark.parametrize("flag, spelled", [("--privacy_", "--privacy dpsgd"), ("privacy.", "privacy.method: dpsgd"),
                                           ("privacy_", "privacy_objective dpsgd")])
def test_dpsgd_without_noise_names_the_choice_as_the_trainer_spells_it(flag, spelled):
    with pytest.raises(DPError, match=f"^{re.escape(spelled)} needs a noise level: pass {re.escape(flag)}noise_mult"):
        dp_options("dpsgd", flag=flag)
