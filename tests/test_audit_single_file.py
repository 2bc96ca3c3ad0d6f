"""Single-file SD1.x base models: the tiny SD1 pipeline written in the original layout, read back offline."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin import cli  # noqa: E402
from smplora_plugin.audit import AuditError, load_lora_target  # noqa: E402
from smplora_plugin.audit.single_file import ARCHITECTURES, detect_layout, load_single_file  # noqa: E402

from _helpers import lora_state, one_thread, to_kohya  # noqa: E402,F401
from _single_file import kohya_sdxl, save_original_layout  # noqa: E402

FAST = json.dumps({"timesteps": [100, 300], "sima_timesteps": [10], "pia_timesteps": [200], "secmi_t": [100],
                   "n_boot": 100})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny SD1 pipeline of original-architecture widths (GroupNorm 32, CLIP heads of 64), as a diffusers
    folder and as one original-layout file, a kohya LoRA for it, and digit images."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from smplora_plugin.tiny_sd import TinySDConfig, save_tiny_pipeline, write_digit_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("single_file")
    cfg = TinySDConfig(unet_channels=(32, 64), unet_norm_groups=32, vae_channels=(32, 32), vae_norm_groups=32,
                       cross_attention_dim=64, text_heads=1)
    folder = save_tiny_pipeline(root / "folder", cfg)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    save_original_layout(pipe, root / "sd1.safetensors")
    save_file(to_kohya(lora_state(pipe.unet, seed=5)), str(root / "kohya.safetensors"))
    write_digit_images(root / "members", n=8, start=0)
    write_digit_images(root / "nonmembers", n=8, start=8)
    torch.set_num_threads(threads)
    return {"root": root, "folder": folder, "file": root / "sd1.safetensors", "lora": root / "kohya.safetensors",
            "members": root / "members", "nonmembers": root / "nonmembers"}


def test_single_file_reads_back_the_same_model(ws):
    parts = load_single_file(ws["file"], tokenizer=ws["folder"])
    assert parts["layout"] == "sd1"
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, ref in (("unet", UNet2DConditionModel.from_pretrained(ws["folder"], subfolder="unet")),
                      ("vae", AutoencoderKL.from_pretrained(ws["folder"], subfolder="vae")),
                      ("text_encoder", CLIPTextModel.from_pretrained(ws["folder"] / "text_encoder"))):
        a, b = ref.state_dict(), parts[name].state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert parts["unet"].config.attention_head_dim == 8 and not parts["unet"].config.use_linear_projection
    assert parts["text_encoder"].config.num_attention_heads == 1  # 64 wide, heads of 64 (CLIP ViT-L/14's)
    from diffusers import DDPMScheduler

    assert torch.equal(parts["scheduler"].alphas_cumprod,
                       DDPMScheduler.from_pretrained(ws["folder"], subfolder="scheduler").alphas_cumprod)
    sched = json.loads((ws["folder"] / "scheduler" / "scheduler_config.json").read_text())
    for k in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"):
        assert parts["scheduler"].config[k] == sched[k], k


def test_single_file_target_equals_folder_target_with_a_kohya_lora(ws):
    a = load_lora_target(ws["file"], ws["lora"], tokenizer=ws["folder"])
    b = load_lora_target(ws["folder"], ws["lora"])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 300)
    c = a.condition(["a handwritten digit 3", ""])
    for adapter in (True, False):
        assert torch.allclose(a.eps(z, t, c, adapter=adapter), b.eps(z, t, c, adapter=adapter), atol=1e-5)
    assert (a.eps(z, t, c) - a.eps(z, t, c, adapter=False)).abs().max() > 1e-3  # the kohya LoRA is in
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.allclose(a.encode(x), b.encode(x), atol=1e-5)


def test_audit_cli_on_a_single_file_base(ws, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws["file"]), "--tokenizer",
            str(ws["folder"]),
            "--lora", str(ws["lora"]), "--members", str(ws["members"]), "--nonmembers", str(ws["nonmembers"]),
            "--resolution", "32", "--draws", "1", "--config", FAST, "--attacks",
            "loss,loss_calibrated,sima,secmi,pia,blind",
            "--out", str(out)]
    assert cli.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["attacks"]) == {"loss", "loss_calibrated", "sima", "secmi", "pia", "blind"}
    assert rep["info"]["base_model"] == str(ws["file"])
    assert all(0 <= r["auc"] <= 1 for r in rep["attacks"].values())
    assert rep["model_passes_per_sample"]["loss"] == 4  # 2 timesteps x 1 draw, adapter and base


def test_single_file_errors_name_the_fix(ws, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(junk))
    with pytest.raises(AuditError, match="not a known single-file layout.*diffusers folder"):
        load_single_file(junk)
    with pytest.raises(AuditError, match="holds LoRA weights, not a base model"):
        load_single_file(ws["lora"])
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(AuditError, match="only safetensors"):
        load_single_file(ckpt)
    with pytest.raises(AuditError, match="SD2.x"):
        detect_layout({"model.diffusion_model.x": 0, "first_stage_model.x": 0, "cond_stage_model.model.x": 0})
    monkeypatch.setitem(ARCHITECTURES["sd1"], "tokenizers", ["smplora-tests/no-such-tokenizer"])
    with pytest.raises(AuditError, match="--tokenizer DIR"):
        load_single_file(ws["file"])
    rc = cli.main(["audit", "--base-model", str(junk), "--lora", str(ws["lora"]), "--members", str(ws["members"]),
                   "--nonmembers", str(ws["nonmembers"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a known single-file layout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = cli.main(["audit", "--base-model", str(ws["folder"]), "--tokenizer", str(ws["folder"]), "--lora",
                   str(ws["lora"]),
                   "--members", str(ws["members"]), "--nonmembers", str(ws["nonmembers"]), "--out",
                   str(tmp_path / "o")])
    assert rc == 2 and "--tokenizer is for a single-file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sdxl_single_file_reads_back_the_same_model(tmp_path):
    """A tiny SDXL of original-architecture conventions (GroupNorm 32, heads of 64, OpenCLIP's gelu) in the SGM
    layout: both text encoders (the second in OpenCLIP's layout), the added conditions and a kohya LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    from smplora_plugin.tiny_xl import TinySDXLConfig, build_sdxl_components

    cfg = TinySDXLConfig(unet_channels=(32, 64), unet_norm_groups=32, attention_head_dim=1, vae_channels=(32, 32),
                         vae_norm_groups=32, text_dim=64, text_dim_2=64, projection_dim=64, text_heads=1)
    parts = build_sdxl_components(cfg)
    te2_config = parts["text_encoder_2"].config
    te2_config.hidden_act = "gelu"
    torch.manual_seed(7)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(te2_config).eval()
    pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    folder = tmp_path / "folder"
    pipe.save_pretrained(str(folder))
    save_original_layout(pipe, tmp_path / "sdxl.safetensors")
    got = load_single_file(tmp_path / "sdxl.safetensors", tokenizer=folder)
    assert got["layout"] == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), got[name].state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert got["unet"].config.addition_time_embed_dim == 8 and got["text_encoder_2"].config.hidden_act == "gelu"
    assert got["vae"].config.scaling_factor == 0.13025

    save_file(kohya_sdxl(lora_state(pipe.unet, seed=4), 1), str(tmp_path / "kohya.safetensors"))
    a = load_lora_target(tmp_path / "sdxl.safetensors", tmp_path / "kohya.safetensors", tokenizer=folder)
    b = load_lora_target(folder, tmp_path / "kohya.safetensors")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 300)
    c = a.condition(["a handwritten digit 3", ""])
    for adapter in (True, False):
        assert torch.allclose(a.eps(z, t, c, adapter=adapter), b.eps(z, t, c, adapter=adapter), atol=1e-5)


# the published diffusers configs of the full-size models (unet/config.json, vae/config.json), for the checks below
SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, use_linear_projection=False, transformer_layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
                 sample_size=64)
SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
                 out_channels=4,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, in_channels=3,
           out_channels=3)


@pytest.mark.parametrize("layout,published", [("sd1", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_full_size_configs_are_read_from_the_shapes(layout, published):
    """SD1.5's and SDXL's published UNet and VAE configs come back from original-layout shapes
    (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from smplora_plugin.audit.single_file import unet_config, vae_config

    from _single_file import unet_to_ldm, vae_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**published)
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, **VAE)
    state = {**unet_to_ldm(unet.state_dict(), 2), **vae_to_ldm(vae.state_dict())}
    if layout == "sdxl":
        state["conditioner.embedders.1.model.text_projection"] = torch.empty(1280, 1280, device="meta")
    got = unet_config(state, layout)
    for k, v in published.items():
        want = [v] * len(got["block_out_channels"]) if k == "transformer_layers_per_block" and isinstance(v, int) else v
        assert got[k] == want, (k, got[k], want)
    got_vae = vae_config(state, layout)
    for k, v in VAE.items():
        assert got_vae[k] == v, k
    assert got_vae["scaling_factor"] == (0.18215 if layout == "sd1" else 0.13025)
