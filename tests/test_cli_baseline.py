"""`smplora audit --baseline`: the base model audited on the same samples and the paired test against it."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin import cli  # noqa: E402

from _helpers import lora_state, one_thread  # noqa: E402,F401

FAST = json.dumps({"timesteps": [100, 300], "n_boot": 100})
ATTACKS = "loss,loss_calibrated,blind"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images

    root = tmp_path_factory.mktemp("audit_baseline")
    base = save_tiny_pipeline(root / "base")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    StableDiffusionPipeline.save_lora_weights(str(root / "lora"), unet_lora_layers=lora_state(unet, 0),
                                              weight_name="lora.safetensors")
    write_digit_images(root / "members", n=8, start=0)
    write_digit_images(root / "nonmembers", n=8, start=8)
    return {"root": root, "base": base, "lora": root / "lora" / "lora.safetensors",
            "members": root / "members", "nonmembers": root / "nonmembers"}


def _argv(ws, out, *extra, attacks=ATTACKS):
    return ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws["base"]), "--lora", str(ws["lora"]),
            "--members", str(ws["members"]), "--nonmembers", str(ws["nonmembers"]), "--out", str(out),
            "--draws", "1", "--config", FAST, "--no-captions", "--attacks", attacks, *extra]


def test_base_model_target_switches_the_lora_off(ws):
    from smplora_plugin.audit import load_lora_target
    from smplora_plugin.audit.baseline_cli import BaseModelTarget
    from smplora_plugin.audit.target import has_capability

    t = load_lora_target(ws["base"], ws["lora"])
    b = BaseModelTarget(t)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tt = torch.full((2,), 200)
    c = t.condition(["", ""])
    off = t.eps(z, tt, c, adapter=False)
    assert (t.eps(z, tt, c) - off).abs().max() > 1e-3  # the LoRA changes the model
    assert torch.allclose(b.eps(z, tt, c), off) and torch.allclose(b.eps(z, tt, c, adapter=False), off)
    assert has_capability(t, "gradients") and not has_capability(b, "gradients")
    assert b.num_train_timesteps == t.num_train_timesteps and b.architecture == t.architecture


def test_baseline_single_run(ws, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(ws, out, "--baseline")) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text().splitlines()
    head = "\n".join(md[:6])
    assert md[2].startswith("**Verdict: ") and "**Beyond the base model: " in head
    line = next(s for s in md if s.startswith("**Beyond the base model: "))
    assert ("yes" in line.split("**")[1] or "no" in line.split("**")[1]) and "p = " in line
    assert line in printed
    rep = json.loads((out / "report.json").read_text())
    b = rep["verdict"]["beyond_base_model"]
    assert b["beyond_base_model"] is (b["verdict"] == "leaks beyond the baseline")
    assert b["line"] == line and b["headline"]["attack"] in ("loss", "loss_calibrated")
    assert "blind" not in b["per_attack"]  # no model: not compared
    base = json.loads((out / "base_model" / "report.json").read_text())
    assert set(base["attacks"]) == set(rep["attacks"])
    # the base model audit scored the same samples with the same noise draws: its denoising loss on
    # the held-out split is the one the LoRA's audit measured with the LoRA switched off
    assert base["utility"]["heldout_denoising_loss"] == pytest.approx(rep["utility"]["heldout_denoising_loss_base"],
                                                                       rel=1e-6)
    # the base model against itself: every model attack scores nothing (loss_calibrated is 0 everywhere)
    assert b["per_attack"]["loss"]["baseline_auc"] == pytest.approx(base["attacks"]["loss"]["auc"])
    assert b["per_attack"]["loss"]["auc"] == pytest.approx(rep["attacks"]["loss"]["auc"])
    assert (out / "manifest.json").is_file() and (out / "base_model" / "report.md").is_file()


def test_without_baseline_nothing_changes(ws, tmp_path):
    out = tmp_path / "out"
    assert cli.main(_argv(ws, out, attacks="loss")) == 0
    assert "Beyond the base model" not in (out / "report.md").read_text()
    assert not (out / "base_model").exists()


def test_baseline_pooled_runs(ws, tmp_path, capsys):
    from smplora_plugin.holdout import write_manifest

    m = sorted(ws["members"].glob("*.png"))
    n = sorted(ws["nonmembers"].glob("*.png"))
    m1 = write_manifest(tmp_path / "m1.json", {"member": m, "nonmember": n})
    m2 = write_manifest(tmp_path / "m2.json", {"member": n, "nonmember": m})
    out = tmp_path / "pooled"
    argv = ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws["base"]), "--out", str(out),
            "--draws", "1", "--config", FAST, "--no-captions", "--attacks", "loss,loss_calibrated", "--baseline",
            "--run", f"{ws['lora']}={m1}", "--run", f"{ws['lora']}={m2}"]
    assert cli.main(argv) == 0
    assert "**Beyond the base model: " in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "**Beyond the base model: " in "\n".join(md.splitlines()[:6])
    rep = json.loads((out / "report.json").read_text())
    b = rep["verdict"]["beyond_base_model"]
    assert b["n_member"] == 8 and "within runs" in b["p_values"]["null"]  # permuted within each pooled run
    base = json.loads((out / "base_model" / "report.json").read_text())
    assert base["pooling"]["n_runs"] == 2 and (out / "base_model" / "run_01_lora_1" / "report.json").is_file()


def test_one_line_yes_and_no():
    from smplora_plugin.audit.baseline_cli import one_line

    c = {"beyond_base_model": True, "headline": {"attack": "loss", "difference": 0.2},
         "envelope": {"attack": "secmi", "difference": 0.3},
         "p_values": {"headline": 0.01, "envelope": 0.004, "level_each": 0.025, "null": "1000 label permutations"}}
    assert one_line(c).startswith("**Beyond the base model: yes** (p = 0.004, secmi;")
    c.update(beyond_base_model=False, p_values={**c["p_values"], "headline": 0.3, "envelope": 0.5})
    assert one_line(c).startswith("**Beyond the base model: no** (p = 0.3, loss;")


def test_baseline_with_no_model_attack_is_refused_first(ws, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(ws, out, "--baseline", attacks="blind")) == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "drop --baseline" in err
    assert not out.exists()
