"""The attacker's fast paths: eval logits through detached weights, and Adam's fused kernel where it has one."""

from __future__ import annotations

import json

import torch

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.attacker import ProxyAttacker, attacker_optimizer
from smplora_plugin.state import read_state, save_state


def test_frozen_logits_are_the_eval_forward_and_train_nothing():
    att = ProxyAttacker(12, (8, 4), dropout=0.5, seed=3)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    att.eval()
    want = att(x)
    att.train()
    got = att.frozen(x)
    assert att.training and torch.equal(got, want)
    got.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in att.parameters())


def test_attacker_adam_is_fused_on_cpu_and_steps_like_plain_adam():
    a, b = ProxyAttacker(16, (8,), seed=1).eval(), ProxyAttacker(16, (8,), seed=1).eval()   # no dropout draws
    fused = attacker_optimizer(a, 1e-2, 1e-4)
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-4)
    assert fused.param_groups[0]["fused"] is True
    x, y = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1] * 3)
    for _ in range(3):
        for att, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(att(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)   # one kernel, the same update rule


def _stepped(tmp_path):
    reg = PrivacyRegularizer(feature_grid=2, hidden=(4,), attacker_lr=1e-2, nonmember_every=1, load_entry_points=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        pred = torch.randn(2, 4, 4, 4, generator=g).requires_grad_(True)
        target = torch.randn(2, 4, 4, 4, generator=g)
        reg.step((pred - target).pow(2).mean(), reg.features(pred, target), reg.features(target * 2, target))
    reg.save(tmp_path / "s.safetensors")
    return reg


def test_a_state_resumes_with_the_optimiser_it_was_saved_with(tmp_path):
    reg = _stepped(tmp_path)
    back = PrivacyRegularizer.load(tmp_path / "s.safetensors", load_entry_points=False)
    assert back.optimizer.param_groups[0]["fused"] is True
    # a state written before the fused kernel (param groups with fused = None) resumes unfused, as it ran
    state = read_state(tmp_path / "s.safetensors")
    meta = json.loads(state["meta.optimizer"])
    for group in meta["param_groups"]:
        group["fused"] = None
    state["meta.optimizer"] = json.dumps(meta)
    save_state(state, tmp_path / "old.safetensors")
    old = PrivacyRegularizer.load(tmp_path / "old.safetensors", load_entry_points=False)
    assert not old.optimizer.param_groups[0]["fused"]
    x = torch.randn(3, reg.attacker.in_features, generator=torch.Generator().manual_seed(5))
    assert torch.equal(old.scores(x), reg.scores(x))
