"""Audit LoRA's baseline option (the base model audited alike, the paired test) and its exposure image output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _comfyui import write_pngs

INPUTS = ["model", "clip", "vae", "lora_name", "member_folder", "nonmember_folder", "resolution", "caption", "attacks",
          "seed"]


@pytest.fixture
def audit(comfy, tmp_path):
    """A LoRA that changes the stand-in's denoiser, image folders, and the node called on them."""
    model, clip, vae = comfy.model_mod.tiny_components(seed=0)
    g = torch.Generator().manual_seed(3)
    lora = {"diffusion_model.conv_in.lora_up.weight": torch.randn(16, 2, generator=g) * 0.3,
            "diffusion_model.conv_in.lora_down.weight": torch.randn(2, 36, generator=g) * 0.3,
            "diffusion_model.conv_out.lora_up.weight": torch.randn(4, 2, generator=g) * 0.3,
            "diffusion_model.conv_out.lora_down.weight": torch.randn(2, 144, generator=g) * 0.3}
    save_file(lora, str(comfy.loras / "changed.safetensors"))
    members = write_pngs(tmp_path / "members", 8, seed=1)
    nonmembers = write_pngs(tmp_path / "nonmembers", 8, seed=2)

    def run(attacks="loss,generation", **extra):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return comfy.nodes.SmploraAuditLora.execute(model, clip, vae, "changed.safetensors", str(members),
                                                        str(nonmembers), 32, "a photo", attacks, 0, **extra)
    return run


def test_schema_keeps_inputs_and_outputs_and_appends_baseline_and_exposure(comfy):
    schema = comfy.nodes.SmploraAuditLora.define_schema()
    assert [i.id for i in schema.inputs] == INPUTS + ["baseline"]
    extra = schema.inputs[-1]
    assert extra.io_type == "BOOLEAN" and extra.optional and extra.extra["default"] is False
    assert [(o.io_type, o.display_name) for o in schema.outputs] == [("STRING", "report"), ("IMAGE", "roc"),
                                                                     ("IMAGE", "exposure")]


def test_baseline_puts_the_paired_test_next_to_the_verdict(comfy, audit):
    out = audit("loss,loss_calibrated,generation", baseline=True)
    text, roc, exposure = out.args
    lines = text.splitlines()
    assert lines[0].startswith("Verdict: ")
    assert lines[1].startswith("Beyond the base model: ") and lines[1].split(":")[1].split()[0] in ("yes", "no")
    assert "p = " in lines[1] and "**" not in lines[1]
    report_dir = comfy.base / "output" / "smplora_audit" / "changed_seed0"
    rep = json.loads((report_dir / "report.json").read_text())
    beyond = rep["verdict"]["beyond_base_model"]
    assert lines[1].split(" (p = ")[0].endswith("yes" if beyond["beyond_base_model"] else "no")
    attack = beyond["headline" if beyond["p_values"]["headline"] <= beyond["p_values"]["envelope"] else "envelope"]
    assert f", {attack['attack']};" in lines[1]
    base = json.loads((report_dir / "base_model" / "report.json").read_text())
    assert set(base["attacks"]) == set(rep["attacks"]) == {"loss", "loss_calibrated", "generation"}
    # the base model scored the very same samples with the LoRA off: its held-out loss is the LoRA audit's base loss
    assert base["utility"]["heldout_denoising_loss"] == pytest.approx(rep["utility"]["heldout_denoising_loss_base"],
                                                                       rel=1e-6)
    assert "**Beyond the base model: " in (report_dir / "report.md").read_text()
    assert roc.ndim == 4 and roc.shape[-1] == 3 and exposure.ndim == 4 and exposure.shape[-1] == 3


def test_exposure_output_is_exposure_png(comfy, audit):
    text, _, exposure = audit().args
    assert "Beyond the base model" not in text
    report_dir = comfy.base / "output" / "smplora_audit" / "changed_seed0"
    assert not (report_dir / "base_model").exists()
    with Image.open(report_dir / "exposure.png") as im:
        png = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    assert exposure.shape == (1, *png.shape) and torch.allclose(exposure[0], torch.from_numpy(png))
    rep = json.loads((report_dir / "report.json").read_text())
    block = rep["exposure"]
    assert block["distance_space"] == "latents" and len(block["members"]) == 4  # 8 members: 4 evaluated
    assert {m["id"] for m in block["members"]} <= {str(p) for p in (comfy.base.parent / "members").glob("*.png")}
    assert "## Exposure: the most exposed members" in text and "evaluation non-members are flagged" in text


def test_baseline_with_only_the_blind_attack_is_refused_before_anything_runs(comfy, audit):
    before = comfy.written()
    with pytest.raises(ValueError, match="baseline compares model-using attacks"):
        audit(attacks="blind", baseline=True)
    assert comfy.written() == before
