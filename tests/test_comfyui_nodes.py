"""The ComfyUI node pack against the stand-in (tests/comfyui_standin): train, save, label, audit, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _comfyui import NOW, conditioning, images, latent, train_inputs, write_pngs


@pytest.fixture
def data(comfy):
    model, clip, vae = comfy.model_mod.tiny_components(seed=0)
    members = latent(vae, images(6, seed=1))
    holdout = latent(vae, images(6, seed=2))
    return dict(model=model, clip=clip, vae=vae, members=members, holdout=holdout,
                positive=conditioning(clip, "a photo"), holdout_positive=conditioning(clip, "a photo"))


def _train(comfy, data, **over):
    base = dict(holdout=[data["holdout"]], holdout_positive=data["holdout_positive"])
    if "holdout_latents" in over:
        base["holdout"] = over.pop("holdout_latents")
    if "holdout_positive" in over:
        base["holdout_positive"] = over.pop("holdout_positive")
    kwargs = train_inputs(data["model"], [data["members"]], data["positive"], base["holdout"],
                          base["holdout_positive"], layout=comfy.nodes_train.TrainLoraNode, **over)
    return comfy.nodes.SmploraTrainLora.execute(**kwargs)


def _plain(comfy, data, **over):
    """ComfyUI's own Train LoRA on the same inputs: ``(lora, loss_map, steps)`` whatever its layout."""
    from smplora_plugin.integrations.comfyui.layout import train_layout

    kwargs = {k: v for k, v in train_inputs(data["model"], [data["members"]], data["positive"], [data["holdout"]],
                                            data["holdout_positive"], layout=comfy.nodes_train.TrainLoraNode,
                                            **over).items() if not k.startswith(("holdout", "privacy"))}
    return train_layout(comfy.nodes_train).pick(comfy.nodes_train.TrainLoraNode.execute(**kwargs).args)


def test_entrypoint_lists_the_four_nodes(comfy):
    from smplora_plugin.integrations.comfyui import NODE_IDS, comfy_entrypoint

    ext = asyncio.run(comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    assert tuple(n.define_schema().node_id for n in nodes) == NODE_IDS


def test_train_schema_has_comfyuis_inputs_plus_privacy(comfy):
    base = [i.id for i in comfy.nodes_train.TrainLoraNode.define_schema().inputs]
    schema = comfy.nodes.SmploraTrainLora.define_schema()
    ours = [i.id for i in schema.inputs]
    assert ours[: len(base)] == base
    assert ours[len(base):] == ["holdout_latents", "holdout_positive", "privacy_preset", "privacy_objective",
                                "privacy_alpha", "privacy_noise_multiplier", "privacy_max_grad_norm",
                                "privacy_target_epsilon", "privacy_dp_delta"]
    # the same outputs on every layout, so one workflow links alike on old and new ComfyUI
    assert [o.display_name for o in schema.outputs] == ["lora", "loss_map", "steps", "privacy"]
    assert [o.io_type for o in schema.outputs] == ["LORA_MODEL", "LOSS_MAP", "INT", "SMPLORA_PRIVACY"]


def test_train_save_label_roundtrip(comfy, data, monkeypatch):
    nt = comfy.nodes_train
    texts = []
    monkeypatch.setattr(comfy.nodes, "progress_sink", lambda cls: texts.append)
    sampler_before, guider_before = nt.TrainSampler, nt.TrainGuider
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = _train(comfy, data, steps=6, training_dtype="bf16")  # bf16 as ComfyUI trains
    assert (nt.TrainSampler, nt.TrainGuider) == (sampler_before, guider_before)  # swapped back
    lora, loss_map, steps, privacy = out.args
    assert steps == 6 and len(loss_map["loss"]) == 6
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(u.abs().sum()) > 0 for u in ups)  # trained from zero
    assert privacy["config"]["calibrated"] is True and privacy["config"]["alpha"] == 20.0
    # robust at batch 2: privacy_fraction 0.25 over steps gives one privacy row on every other step
    assert privacy["metrics"]["step"] == 6.0 and privacy["metrics"]["attacker_updates"] == 3.0
    assert privacy["data"] == {"members": 6, "nonmembers": 6, "steps": 6, "batch_size": 2, "trainer": "comfyui"}
    postfix = nt.PBARS[-1].postfixes[-1]  # the progress bar shows the defense's metrics
    assert {"loss", "adapt_loss", "mia_ce", "mia_acc"} <= set(postfix)
    assert len(texts) == 6 and texts[-1].startswith("step 6/6: loss=") and "mia_acc=" in texts[-1]  # the UI's text

    saved = comfy.nodes.SmploraSaveLora.execute(lora, privacy, "mine/smp", "models/loras", steps=6)
    rel = saved.args[0]
    assert rel == "mine/smp_6_steps_00001_.safetensors"
    path = comfy.loras / rel
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        assert set(f.keys()) == set(lora)
    assert header["smplora.method"] == "smp-lora"
    assert json.loads(header["smplora.config"])["privacy_fraction"] == 0.25
    assert json.loads(header["smplora.data"])["nonmembers"] == 6
    assert json.loads(header["smplora.metrics"])["step"] == 6.0

    label = comfy.nodes.SmploraLoraPrivacyLabel.execute(rel).args[0]
    assert "trained with the membership-inference defense: smp-lora" in label
    assert "alpha=20.0" in label and "members=6" in label


def test_privacy_term_changes_the_trained_lora(comfy, data):
    a = _plain(comfy, data, steps=2)[0]
    b = _train(comfy, data, privacy_preset="paper", privacy_alpha=50.0, steps=2).args[0]
    assert set(a) == set(b)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff > 1e-5


def test_training_is_repeatable_and_leaves_the_global_rng_alone(comfy, data):
    state = torch.get_rng_state()
    a = _train(comfy, data, steps=2).args[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # a different global state must not change the result
    b = _train(comfy, data, steps=2).args[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@NOW
def test_lora_off_switches_only_trainable_adapters(comfy, data):
    from smplora_plugin.integrations.comfyui.training import ComfyTrainingError, lora_off

    model = comfy.nodes_train.train(data["model"], [data["members"]], [data["positive"]], 2, 2, 1, 1e-2, 2, "AdamW",
                                    "MSE", 3, "fp32", "fp32", "[None]", False)[0]
    comfy_mm = __import__("comfy.model_management", fromlist=["x"])
    comfy_mm.load_models_gpu([model])
    for m in model.model.modules():  # the trained adapters are still attached, frozen after training
        for f in getattr(m, "weight_function", []):
            f.requires_grad_(True)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 2.0])
    ctx = data["positive"][0][0].expand(2, -1, -1)
    with torch.no_grad():
        on = model.model.apply_model(x, sigma, c_crossattn=ctx)
        with lora_off(model.model):
            off = model.model.apply_model(x, sigma, c_crossattn=ctx)
        again = model.model.apply_model(x, sigma, c_crossattn=ctx)
    assert not torch.allclose(on, off) and torch.equal(on, again)
    bare = comfy.model_mod.tiny_components(seed=0)[0]
    with pytest.raises(ComfyTrainingError, match="no trainable LoRA adapter"):
        with lora_off(bare.model):
            pass


@pytest.mark.parametrize("change, match", [
    ("overlap", "equal training latents"),
    ("size", "encode the held-out images at the training resolution"),
    ("few", "add held-out images or lower batch_size"),
    ("conds", "held-out conditionings"),
    ("preset", "preset 'nope' is unknown"),
    ("empty", "holdout_latents is empty"),
])
def test_train_bad_inputs_fail_before_training(comfy, data, change, match):
    nt = comfy.nodes_train
    over = {}
    if change == "overlap":
        overlap = torch.cat([data["holdout"]["samples"][:5], data["members"]["samples"][:1]])
        over["holdout_latents"] = [{"samples": overlap}]
    elif change == "size":
        over["holdout_latents"] = [{"samples": torch.zeros(6, 4, 8, 8)}]
    elif change == "few":
        over["holdout_latents"] = [{"samples": data["holdout"]["samples"][:1]}]
        over["batch_size"], over["privacy_preset"] = 4, "paper"
    elif change == "conds":
        over["holdout_positive"] = conditioning(data["clip"], "a") + conditioning(data["clip"], "b")
    elif change == "preset":
        over["privacy_preset"] = "nope"
    elif change == "empty":
        over["holdout_latents"] = []
    n_bars = len(nt.PBARS)
    with pytest.raises(ValueError, match=match):
        _train(comfy, data, **over)
    assert len(nt.PBARS) == n_bars  # no training step ran
    assert nt.TrainSampler.__module__ == nt.__name__
    assert comfy.written() == []


def test_save_rejects_foreign_inputs_and_writes_nothing(comfy):
    with pytest.raises(ValueError, match="privacy output of Train LoRA"):
        comfy.nodes.SmploraSaveLora.execute({"a.lora_up.weight": torch.zeros(2, 2)}, {"x": 1}, "p", "output")
    with pytest.raises(ValueError, match="not a LoRA state dict"):
        comfy.nodes.SmploraSaveLora.execute({}, {"file_metadata": {}}, "p", "output")
    assert comfy.written() == []


def test_label_plain_and_kohya_lora(comfy):
    save_file({"w": torch.zeros(2)}, str(comfy.loras / "plain.safetensors"))
    save_file({"w": torch.zeros(2)}, str(comfy.loras / "kohya.safetensors"),
              metadata={"ss_network_dim": "8", "ss_base_model_version": "sd_v1"})
    label = comfy.nodes.SmploraLoraPrivacyLabel.execute("plain.safetensors").args[0]
    assert "no privacy information" in label and "kohya" not in label
    label = comfy.nodes.SmploraLoraPrivacyLabel.execute("kohya.safetensors").args[0]
    assert "no privacy information" in label and "ss_network_dim=8" in label
    (comfy.loras / "old.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        comfy.nodes.SmploraLoraPrivacyLabel.execute("old.ckpt")


def _saved_lora(comfy, data) -> str:
    lora, _, steps, privacy = _train(comfy, data, steps=4).args
    return comfy.nodes.SmploraSaveLora.execute(lora, privacy, "audited", "models/loras", steps=steps).args[0]


def test_audit_node_reports_and_plots(comfy, data, tmp_path):
    name = _saved_lora(comfy, data)
    m = write_pngs(tmp_path / "members", 8, seed=1)
    n = write_pngs(tmp_path / "nonmembers", 8, seed=2)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = comfy.nodes.SmploraAuditLora.execute(data["model"], data["clip"], data["vae"], name, str(m), str(n), 32,
                                                   "a photo", "loss,mlp", 0)
    text, roc, exposure = out.args
    assert text.startswith("Verdict: ") and "Headline attack" in text and "loss" in text
    assert "Training DP" not in text  # this LoRA has no smplora.dp header entry: nothing about DP is shown
    for img in (roc, exposure):
        assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3
        assert 0 <= float(img.min()) <= float(img.max()) <= 1
    assert float(exposure.std()) > 0  # a drawn figure, not the blank stand-in
    report_dir = comfy.base / "output" / "smplora_audit" / "audited_4_steps_00001__seed0"
    assert (report_dir / "report.json").is_file() and (report_dir / "roc.png").is_file()
    assert (report_dir / "exposure.png").is_file() and "## Exposure: the most exposed members" in text
    ranked = json.loads((report_dir / "report.json").read_text())["exposure"]["members"]
    assert len(ranked) == 4 and ranked[0]["rank"] == 1  # 8 members, half of them in the evaluation split


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("same", "same folder"),
    ("overlap", "byte-identical"),
    ("few", "needs at least 8"),
    ("arch", "matches none of this model's layers"),
    ("shape", "does not fit this model's layer sizes"),
])
def test_audit_bad_inputs_write_nothing(comfy, data, tmp_path, case, match):
    import shutil

    m = write_pngs(tmp_path / "members", 8, seed=1)
    n = write_pngs(tmp_path / "nonmembers", 8, seed=2)
    save_file({"diffusion_model.conv_in.lora_up.weight": torch.zeros(16, 2),
               "diffusion_model.conv_in.lora_down.weight": torch.zeros(2, 36)}, str(comfy.loras / "ok.safetensors"))
    name = "ok.safetensors"
    if case == "missing":
        n = tmp_path / "nowhere"
    elif case == "same":
        n = m
    elif case == "overlap":
        shutil.copy(m / "img_00.png", n / "copy.png")
    elif case == "few":
        n = write_pngs(tmp_path / "few", 3, seed=3)
    elif case == "arch":
        save_file({"transformer.blocks.0.attn.lora_up.weight": torch.zeros(8, 2),
                   "transformer.blocks.0.attn.lora_down.weight": torch.zeros(2, 8)},
                  str(comfy.loras / "dit.safetensors"))
        name = "dit.safetensors"
    elif case == "shape":
        save_file({"diffusion_model.conv_in.lora_up.weight": torch.zeros(320, 2),
                   "diffusion_model.conv_in.lora_down.weight": torch.zeros(2, 36)},
                  str(comfy.loras / "big.safetensors"))
        name = "big.safetensors"
    before = comfy.written()
    with pytest.raises(ValueError, match=match):
        comfy.nodes.SmploraAuditLora.execute(data["model"], data["clip"], data["vae"], name, str(m), str(n), 32, "",
                                             "loss", 0)
    assert comfy.written() == before


def test_target_maps_comfyuis_x0_prediction_to_ddpm_eps(comfy, data):
    from smplora_plugin.integrations.comfyui.target import ComfyTarget

    model = data["model"]
    loads = []
    target = ComfyTarget(model, data["clip"], data["vae"], model, data["clip"], load_models=loads.append)
    sigmas = model.model.model_sampling.sigmas
    assert torch.allclose(target.alphas_cumprod, 1 / (1 + sigmas ** 2)) and target.num_train_timesteps == len(sigmas)
    gen = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([3, 40, 90])
    ac = target.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps  # the audit's DDPM view

    def perfect(x, sigma, **kwargs):  # ComfyUI's contract: input x0 + sigma * eps, output the x0 prediction
        assert torch.allclose(x, x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-4)
        return x0

    model.model.apply_model = perfect
    try:
        out = target.eps(z_t, t, ["", "", ""], adapter=False)
    finally:
        del model.model.apply_model
    assert torch.allclose(out, eps, atol=1e-4) and loads == [[model]]


def test_target_refuses_flow_models(comfy, data):
    from smplora_plugin.audit import AuditError
    from smplora_plugin.integrations.comfyui.target import ComfyTarget

    class Flow(torch.nn.Module):
        sigmas = torch.linspace(1.0, 0.001, 10)

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return sigma * noise + (1 - sigma) * latent_image

    model = data["model"]
    real = model.model.model_sampling
    model.model.model_sampling = Flow()
    try:
        with pytest.raises(AuditError, match="flow-matching"):
            ComfyTarget(model, data["clip"], data["vae"], model, data["clip"], load_models=lambda m: None)
    finally:
        model.model.model_sampling = real


def test_report_text_shows_verdict_when_present():
    from smplora_plugin.integrations.comfyui.verdict import report_text

    class Report:
        def __init__(self, d):
            self.d = d

        def to_dict(self):
            return self.d

        def markdown(self):
            return "| table |"

    base = {"max_over_attacks": {"auc": {"value": 0.61, "attack": "pia", "ci95": [0.5, 0.7]},
                                 "tpr_at_1pct_fpr": {"value": 0.05, "attack": "pia"}}, "null_band_auc95": [0.4, 0.6]}
    text = report_text(Report(base))
    assert text.startswith("max-attack AUC 0.610 [0.50, 0.70] (pia); TPR at 1% FPR 5.0%; "
                           "chance band for AUC [0.40, 0.60]")
    assert text.endswith("| table |")
    summary = "Verdict: leaks. Headline attack pia (chosen on calibration, ...)"
    leaks = Report({**base, "verdict": {"verdict": "leaks", "summary": summary}})
    assert report_text(leaks).startswith(summary + "\n\n")
    no_verdict = {"verdict": None, "summary": "no model-using attack was run: no verdict."}
    assert report_text(Report({**base, "verdict": no_verdict})).startswith("max-attack AUC 0.610")
