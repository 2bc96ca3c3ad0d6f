"""DP-SGD (and SMP-LoRA + DP noise) in Train LoRA (SMP-LoRA), on the stand-in at both ComfyUI layouts.

ComfyUI applies the LoRA in weight space (or through the adapter's functional ``h`` in bypass mode), so the
node trains on batches of one: every backward is one image's, ``DPTraining(capture="grads")`` reads it from
``p.grad``, and ``grad_accumulation_steps`` micro-steps make one DP step of ``B`` images.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from _comfyui import NOW, images, latent, train_inputs

pytest.importorskip("opacus")

DP = dict(privacy_objective="dpsgd", privacy_noise_multiplier=1.0, batch_size=1, grad_accumulation_steps=3, steps=2)


@pytest.fixture
def data(comfy):
    from _comfyui import conditioning

    model, clip, vae = comfy.model_mod.tiny_components(seed=0)
    return dict(model=model, clip=clip, vae=vae, members=latent(vae, images(6, seed=1)),
                holdout=latent(vae, images(6, seed=2)), positive=conditioning(clip, "a photo"))


def _inputs(comfy, data, holdout=True, **over):
    kwargs = train_inputs(data["model"], [data["members"]], data["positive"], [data["holdout"]], data["positive"],
                          layout=comfy.nodes_train.TrainLoraNode, **over)
    if not holdout:  # DP-SGD alone needs no held-out images: the optional inputs are left unconnected
        del kwargs["holdout_latents"], kwargs["holdout_positive"]
    return kwargs


def _train(comfy, data, holdout=True, **over):
    return comfy.nodes.SmploraTrainLora.execute(**_inputs(comfy, data, holdout=holdout, **over))


def _trained(comfy, lora):
    """The LoRA's trained tensors (every key but the adapters' fixed alpha), in the optimiser's order."""
    return {k: v for k, v in lora.items() if not k.endswith(".alpha")}


def test_dpsgd_trains_the_lora_and_reports_epsilon_with_its_sampling(comfy, data, monkeypatch):
    nt = comfy.nodes_train
    texts = []
    monkeypatch.setattr(comfy.nodes, "progress_sink", lambda cls: texts.append)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        lora, loss_map, steps, privacy = _train(comfy, data, holdout=False, **DP).args
    assert steps == 2 and len(loss_map["loss"]) == 6           # 2 optimiser steps of 3 micro-steps of one image
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and all(float(u.abs().sum()) > 0 for u in ups)  # trained from zero (noise reaches every tensor)
    dp = privacy["dp"]
    assert dp["summary"].startswith("dp-sgd: epsilon ") and "fixed-size batches do not satisfy" in dp["summary"]
    assert "expected batch 3 of 6" in dp["summary"] and "after 2 steps" in dp["summary"]
    assert "with replacement" in dp["sampling"] and privacy["data"]["sampling"] == dp["sampling"]
    assert privacy["metrics"]["smplora/dp_steps"] == 2.0 and privacy["metrics"]["smplora/epsilon"] > 0
    assert privacy["config"] is None and privacy["data"]["nonmembers"] == 0
    assert privacy["data"]["grad_accumulation_steps"] == 3 and privacy["data"]["batch_size"] == 1
    postfix = nt.PBARS[-1].postfixes[-1]
    assert "eps" in postfix and "mia_acc" not in postfix        # no attacker under DP-SGD alone
    assert len(texts) == 7 and texts[0].startswith("step 1/6: loss=") and "eps=" in texts[-2]
    assert texts[-1] == f"{dp['summary']} {dp['sampling']}."    # the node's last text: epsilon with its sampling

    saved = comfy.nodes.SmploraSaveLora.execute(lora, privacy, "dp/tiny", "models/loras", steps=steps)
    with safe_open(str(comfy.loras / saved.args[0]), framework="pt") as f:
        header = f.metadata()
        assert set(f.keys()) == set(lora)
    assert header["smplora.method"] == "dp-sgd"
    entry = json.loads(header["smplora.dp"])
    assert entry["epsilon"] == pytest.approx(privacy["metrics"]["smplora/epsilon"]) and entry["epsilon"] > 0
    assert (entry["sigma"], entry["clip"], entry["steps"], entry["expected_batch_size"], entry["dataset_size"]) == \
        (1.0, 1.0, 2, 3.0, 6)
    assert entry["sampling"] == "fixed_batch" and "do not satisfy its assumption" in entry["assumption"]
    assert json.loads(header["smplora.data"])["sampling"] == dp["sampling"]
    assert f"DP noise: {dp['summary']} {dp['sampling']}." in saved.ui.value   # Save LoRA's UI text
    label = comfy.nodes.SmploraLoraPrivacyLabel.execute(saved.args[0]).args[0]
    assert f"DP noise (dp-sgd): epsilon {entry['epsilon']:.4g} at delta" in label and "fixed-size batches" in label
    assert "empirical defense" not in label and "smplora.dp:" not in label  # DP-SGD alone makes no SMP claim


def test_dp_update_equals_the_reference_mechanism_on_the_same_per_sample_gradients(comfy, data, monkeypatch):
    """Record each micro-step's gradient from ComfyUI's own backward (before DPTraining touches it); the core's
    DPGradients on those gradients, with the node's noise seed, gives the LoRA the node trained, step by step."""
    from smplora_plugin.dp import DPGradients
    from smplora_plugin.integrations.comfyui.training import dp_seed

    nt = comfy.nodes_train
    original = nt.TrainSampler.fwd_bwd
    record = {"init": None, "grads": [], "acc": []}

    def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args, dataset_size,
                bwd=True):
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if record["init"] is None:
            record["init"] = [p.detach().clone() for p in params]
        loss = original(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                        dataset_size, bwd=bwd)
        # ComfyUI backpropagated loss / grad_acc of one image; the previous image's gradient was collected already
        record["grads"].append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() * self.grad_acc
                                for p in params])
        record["acc"].append(self.grad_acc)
        return loss

    monkeypatch.setattr(nt.TrainSampler, "fwd_bwd", fwd_bwd)
    sigma, clip, lr, seed, b, steps = 0.5, 0.02, 0.05, 7, 3, 2
    with torch.inference_mode():
        lora = _train(comfy, data, holdout=False, optimizer="SGD", learning_rate=lr, seed=seed,
                      **{**DP, "privacy_noise_multiplier": sigma, "privacy_max_grad_norm": clip,
                         "grad_accumulation_steps": b, "steps": steps}).args[0]
    assert len(record["grads"]) == b * steps and set(record["acc"]) == {b}

    ref = [t.clone().requires_grad_(True) for t in record["init"]]
    dp = DPGradients(ref, max_grad_norm=clip, noise_multiplier=sigma, dataset_size=6, expected_batch_size=b,
                     sampling="fixed_batch", generator=torch.Generator().manual_seed(dp_seed(seed)))
    opt = torch.optim.SGD(ref, lr=lr)
    norms = []
    for step in range(steps):
        for grads in record["grads"][step * b:(step + 1) * b]:
            norms.append(float(dp.add_per_sample([g.unsqueeze(0) for g in grads])))
        opt.zero_grad(set_to_none=True)
        dp.step()
        opt.step()
    assert max(norms) > clip  # clipping acts
    trained = _trained(comfy, lora)
    assert len(trained) == len(ref)
    for (key, got), want in zip(trained.items(), ref):
        torch.testing.assert_close(got.float(), want.detach().float(), rtol=1e-5, atol=1e-7, msg=key)
    # and ComfyUI's own (non-private) mean gradient would have given another LoRA
    plain = [t.clone() - lr * torch.stack([g[i] for g in record["grads"][:b]]).mean(0)
             for i, t in enumerate(record["init"])]
    assert any(not torch.allclose(p, w.detach()) for p, w in zip(plain, ref))


@NOW
def test_bypass_mode_trains_the_same_dp_lora_as_weight_mode(comfy, data):
    weight = _train(comfy, data, holdout=False, bypass_mode=False, **DP).args
    bypass = _train(comfy, data, holdout=False, bypass_mode=True, **DP).args
    assert set(weight[0]) == set(bypass[0])
    for k in weight[0]:
        assert torch.allclose(weight[0][k], bypass[0][k], atol=1e-5), k
    assert weight[3]["dp"]["summary"] == bypass[3]["dp"]["summary"]


def test_smp_lora_with_dp_noise_trains_each_images_own_term(comfy, data, monkeypatch):
    """SMP-LoRA + DP noise: every micro-step (one image) goes through reg.step_per_sample with that image's row
    (privacy_fraction does not apply), which at batch 1 is reg.step's objective; the attacker is updated once per
    optimiser step."""
    from smplora_plugin import PrivacyRegularizer

    calls = []
    per_sample = PrivacyRegularizer.step_per_sample

    def spy(self, losses, member_feats, nonmember_feats=None, **kw):
        calls.append((losses.detach().clone(), member_feats.detach().clone(),
                      None if nonmember_feats is None else nonmember_feats.detach().clone(), kw, self.config))
        return per_sample(self, losses, member_feats, nonmember_feats, **kw)

    def no_batch_step(self, *args, **kwargs):
        raise AssertionError("reg.step must not run under DP noise")

    monkeypatch.setattr(PrivacyRegularizer, "step_per_sample", spy)
    monkeypatch.setattr(PrivacyRegularizer, "step", no_batch_step)
    lora, _, steps, privacy = _train(comfy, data, privacy_preset="robust",
                                     **{**DP, "privacy_objective": "smp", "grad_accumulation_steps": 2,
                                        "steps": 3}).args
    assert len(calls) == 6 and all(c[0].shape == (1,) and c[1].shape[0] == 1 for c in calls)
    assert [c[3]["update_attacker"] for c in calls] == [False, True] * 3
    assert privacy["metrics"]["step"] == 6.0 and privacy["metrics"]["attacker_updates"] == 3.0
    assert privacy["dp"]["summary"].startswith("smp-lora + dp noise: epsilon ")
    assert "proxy attacker is trained on member features" in privacy["dp"]["summary"]
    assert privacy["file_metadata"]["smplora.method"] == "smp-lora"
    assert json.loads(privacy["file_metadata"]["smplora.dp"])["objective"] == "smp-lora + dp noise"
    assert privacy["data"]["nonmembers"] == 6 and privacy["metrics"]["smplora/dp_steps"] == 3.0

    # at batch 1, step_per_sample's objective is reg.step's: same value and gradient from the same state
    losses, member, nonmember, _, config = calls[1]
    monkeypatch.undo()
    a, b = PrivacyRegularizer(config), PrivacyRegularizer(config)
    la, lb = losses.clone().requires_grad_(True), losses.clone().requires_grad_(True)
    ma, mb = member.clone().requires_grad_(True), member.clone().requires_grad_(True)
    out_a = a.step(la.mean(), ma, nonmember)
    out_b = b.step_per_sample(lb, mb, nonmember)
    torch.testing.assert_close(out_a, out_b)
    (out_a + ma.sum() * 0).backward()
    out_b.backward()
    torch.testing.assert_close(la.grad, lb.grad)
    torch.testing.assert_close(ma.grad, mb.grad)

    dp_alone = _train(comfy, data, holdout=False, **{**DP, "grad_accumulation_steps": 2, "steps": 3}).args[0]
    assert any(not torch.allclose(lora[k], dp_alone[k]) for k in lora)  # the privacy term changes the DP LoRA


def test_bucket_mode_trains_with_dp_noise(comfy, data):
    small = latent(data["vae"], images(3, seed=5, size=16))
    kwargs = _inputs(comfy, data, holdout=False, bucket_mode=True, **DP)
    kwargs["latents"] = [data["members"], small]
    kwargs["positive"] = [data["positive"] * 6, data["positive"] * 3]
    lora, loss_map, steps, privacy = comfy.nodes.SmploraTrainLora.execute(**kwargs).args
    assert steps == 2 and len(loss_map["loss"]) == 6
    assert "expected batch 3 of 9" in privacy["dp"]["summary"]


def test_dp_inputs_at_zero_train_as_before(comfy, data):
    """Existing workflows: the DP inputs absent (old workflow files) or at their defaults train the same LoRA."""
    absent = _train(comfy, data, steps=2).args
    zeros = _train(comfy, data, steps=2, privacy_noise_multiplier=0.0, privacy_max_grad_norm=0.0,
                   privacy_target_epsilon=0.0, privacy_dp_delta=0.0).args
    assert all(torch.equal(absent[0][k], zeros[0][k]) for k in absent[0])
    assert "dp" not in absent[3] and "smplora.dp" not in absent[3]["file_metadata"]
    assert absent[3]["data"] == zeros[3]["data"]


def _refused(comfy, match, **over):
    nt = comfy.nodes_train
    bars, samplers = len(nt.PBARS), len(nt.SAMPLERS)
    with pytest.raises(ValueError, match=match):
        comfy.nodes.SmploraTrainLora.execute(**over)
    assert len(nt.PBARS) == bars and len(nt.SAMPLERS) == samplers   # nothing trained, no sampler built
    assert nt.TrainSampler.__module__ == nt.__name__                  # ComfyUI's classes are back
    assert comfy.written() == []


@pytest.mark.parametrize("objective", ["dpsgd", "smp"])
def test_batch_size_above_one_is_refused_naming_the_fix(comfy, data, objective):
    kwargs = _inputs(comfy, data, **{**DP, "privacy_objective": objective, "batch_size": 2})
    _refused(comfy, r"batch_size 1 and grad_accumulation_steps to the batch you want .* \(e\.g\. 6 for batch_size 2 "
                    r"x grad_accumulation_steps 3\)", **kwargs)


@pytest.mark.parametrize("over, match", [
    (dict(privacy_noise_multiplier=0.0), "privacy_objective dpsgd needs a noise level"),
    (dict(privacy_noise_multiplier=-1.0), "privacy_noise_multiplier=-1.0 must be a finite number > 0"),
    (dict(privacy_noise_multiplier=float("nan")), "privacy_noise_multiplier=nan must be a finite number"),
    (dict(privacy_max_grad_norm=-0.5), "privacy_max_grad_norm=-0.5 must be a finite number > 0"),
    (dict(privacy_dp_delta=1.5), r"privacy_dp_delta=1.5 is outside \(0, 1\)"),
    (dict(privacy_target_epsilon=8.0), "not both"),
    (dict(privacy_objective="smp", privacy_noise_multiplier=0.0, privacy_max_grad_norm=0.5, batch_size=2),
     "privacy_max_grad_norm given without a DP mechanism"),
    (dict(grad_accumulation_steps=7), "lower grad_accumulation_steps to at most 6"),
    (dict(existing_lora="old.safetensors"), "existing_lora 'old.safetensors'.*existing_lora \\[None\\]"),
    (dict(privacy_noise_multiplier="1"), "must be a number"),
])
def test_bad_dp_inputs_are_refused_before_training(comfy, data, over, match):
    kwargs = _inputs(comfy, data, **{**DP, **over})   # held-out images connected (dpsgd does not use them)
    if "existing_lora" in over:  # the older layout has the input too; a name that is not [None] is enough
        kwargs["existing_lora"] = [over["existing_lora"]]
    _refused(comfy, match, **kwargs)


def test_target_epsilon_chooses_sigma_and_an_unreachable_one_is_refused_before_training(comfy, data, monkeypatch):
    lora, _, steps, privacy = _train(comfy, data, holdout=False, **{**DP, "privacy_noise_multiplier": 0.0,
                                                                     "privacy_target_epsilon": 8.0}).args
    entry = json.loads(privacy["file_metadata"]["smplora.dp"])
    assert entry["target_epsilon"] == 8.0 and entry["planned_steps"] == 2 and entry["steps"] == 2
    assert 0 < entry["epsilon"] <= 8.0 and entry["sigma"] > 0
    assert "Target epsilon 8 over 2 planned steps" in privacy["dp"]["summary"]
    # Opacus takes minutes to search sigma up to 1e6 before it gives up; its refusal is the core's (tested in
    # tests/test_dp_*.py): here, that it comes before anything is trained
    import smplora_plugin.dp.gradients as gradients
    from smplora_plugin.dp import DPError

    def unreachable(target, **kw):
        raise DPError(f"target_epsilon={target} is not reachable (stand-in for Opacus's search)")

    monkeypatch.setattr(gradients, "noise_multiplier_for", unreachable)
    kwargs = _inputs(comfy, data, holdout=False, **{**DP, "privacy_noise_multiplier": 0.0,
                                                   "privacy_target_epsilon": 1e-6})
    _refused(comfy, "target_epsilon=1e-06 is not reachable", **kwargs)


def test_smp_without_held_out_images_is_refused(comfy, data):
    kwargs = _inputs(comfy, data, holdout=False, steps=2)
    _refused(comfy, "connect holdout_latents and holdout_positive .* or choose privacy_objective dpsgd", **kwargs)


@NOW
def test_fp16_loss_scaling_is_refused_before_the_first_step(comfy, data, monkeypatch):
    """training_dtype none on an fp16 model with fp32 LoRA weights makes ComfyUI use a GradScaler: refused by the
    node before ComfyUI starts, and (should the node miss it) by the sampler before its first step."""
    model = data["model"].clone()
    model.model = model.model.half()
    data = {**data, "model": model}
    kwargs = _inputs(comfy, data, holdout=False, training_dtype="none", lora_dtype="fp32", **DP)
    _refused(comfy, "GradScaler.*training_dtype bf16", **kwargs)
    monkeypatch.setattr(comfy.nodes, "_model_dtype", lambda model: None)   # the node cannot tell the dtype
    nt = comfy.nodes_train
    bars = len(nt.PBARS)
    with pytest.raises(ValueError, match="fp16 mixed precision is not supported"):
        comfy.nodes.SmploraTrainLora.execute(**_inputs(comfy, data, holdout=False, training_dtype="none",
                                                       lora_dtype="fp32", **DP))
    assert len(nt.PBARS) == bars and comfy.written() == []


def test_save_refuses_a_dp_privacy_output_without_its_entry(comfy, data):
    lora, _, steps, privacy = _train(comfy, data, holdout=False, **DP).args
    broken = {**privacy, "file_metadata": {k: v for k, v in privacy["file_metadata"].items() if k != "smplora.dp"}}
    with pytest.raises(ValueError, match="carries no smplora.dp entry"):
        comfy.nodes.SmploraSaveLora.execute(lora, broken, "dp/x", "models/loras", steps=steps)
    assert comfy.written() == []
