"""The tiny SDXL, FLUX and SD3 builders (smplora_plugin.tiny_xl): seeded, saved, reloaded offline, runnable."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from smplora_plugin import tiny_xl  # noqa: E402
from smplora_plugin.errors import ConfigError  # noqa: E402
from smplora_plugin.tiny_xl import TinyFluxConfig, TinySD3Config, TinySDXLConfig, build_t5_tokenizer, t5_pieces  # noqa: E402

ARCHS = {
    "sdxl": ("StableDiffusionXLPipeline", "unet", TinySDXLConfig),
    "flux": ("FluxPipeline", "transformer", TinyFluxConfig),
    "sd3": ("StableDiffusion3Pipeline", "transformer", TinySD3Config),
}


def _generate(pipe, name: str, seed: int):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    if name != "sdxl":
        kwargs["max_sequence_length"] = 16
    return torch.from_numpy(pipe("a handwritten digit 7", **kwargs).images)


def test_t5_tokenizer_built_here_keeps_words_whole_and_spells_the_rest(tmp_path):
    tok = build_t5_tokenizer(max_length=12)
    ids = tok("a handwritten digit 7").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁handwritten", "▁digit", "▁7", "</s>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)     # T5's layout
    spelled = tok.convert_ids_to_tokens(tok("Zebra").input_ids)
    assert spelled[0] == "▁Z" and "".join(spelled[:-1]).replace("▁", "") == "Zebra"
    assert tok.unk_token_id in tok("日").input_ids                                  # outside the pieces
    padded = tok("a digit", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(padded) == 12 and padded[-1] == tok.pad_token_id
    assert len(tok) == len(t5_pieces())
    tok.save_pretrained(str(tmp_path))
    from transformers import T5TokenizerFast

    again = T5TokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("a handwritten digit 7 Zebra").input_ids == tok("a handwritten digit 7 Zebra").input_ids


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_tiny_pipeline_is_seeded_saves_reloads_offline_and_generates(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    cls_name, denoiser, config_cls = ARCHS[name]
    build = getattr(tiny_xl, f"build_{name}_pipeline")
    pipe, twin = build(), build()
    assert type(pipe).__name__ == cls_name
    for part in (denoiser, "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(pipe, part).state_dict(), getattr(twin, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    first = _generate(pipe, name, seed=3)
    assert first.shape == (1, 32, 32, 3) and torch.isfinite(first).all()
    assert torch.equal(first, _generate(pipe, name, seed=3))                  # deterministic for a seed
    assert not torch.equal(first, _generate(pipe, name, seed=4))

    folder = getattr(tiny_xl, f"save_tiny_{name}_pipeline")(tmp_path / name)
    meta = json.loads((folder / f"tiny_{name}_config.json").read_text())
    assert meta["seed"] == config_cls().seed and meta["resolution"] == 32
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 8_000_000
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(loaded).__name__ == cls_name
    # the saved weights are the built ones (equal state dicts; FLUX's reloaded transformer differs by ~1e-6 in float
    # rounding, so the images are compared to 1e-5, far below what a different or missing weight would give)
    for part in (denoiser, "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(_generate(loaded, name, seed=3), first, atol=1e-5, rtol=1e-5)


def test_sdxl_unet_takes_the_added_text_and_time_conditions():
    cfg = TinySDXLConfig()
    parts = tiny_xl.build_sdxl_components(cfg)
    unet = parts["unet"]
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == cfg.text_dim + cfg.text_dim_2
    assert parts["text_encoder_2"].config.projection_dim == cfg.projection_dim
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, cfg.max_length, cfg.text_dim + cfg.text_dim_2, generator=torch.Generator().manual_seed(1))
    cond = {"text_embeds": torch.randn(2, cfg.projection_dim, generator=torch.Generator().manual_seed(2)),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)}
    with torch.no_grad():
        out = unet(lat, torch.tensor([10, 500]), ctx, added_cond_kwargs=cond).sample
        other = unet(lat, torch.tensor([10, 500]), ctx,
                     added_cond_kwargs={**cond, "time_ids": cond["time_ids"] * 2}).sample
    assert out.shape == lat.shape and not torch.equal(out, other)              # time ids reach the output


def test_flux_and_sd3_sizes_follow_the_config():
    flux = tiny_xl.build_flux_components(TinyFluxConfig(guidance_embeds=False, num_single_layers=2))
    assert flux["vae"].config.latent_channels == 16 and flux["transformer"].config.in_channels == 64
    assert len(flux["transformer"].transformer_blocks) == 1 and len(flux["transformer"].single_transformer_blocks) == 2
    assert flux["transformer"].config.guidance_embeds is False
    assert flux["transformer"].config.joint_attention_dim == flux["text_encoder_2"].config.d_model
    sd3 = tiny_xl.build_sd3_components()
    assert sd3["transformer"].config.joint_attention_dim == sd3["text_encoder_3"].config.d_model
    assert sd3["transformer"].config.pooled_projection_dim == 2 * TinySD3Config().projection_dim


@pytest.mark.parametrize("builder, config, match", [
    ("build_sdxl_components", TinySDXLConfig(resolution=34), "resolution=34 must be divisible by 4"),
    ("build_sdxl_components", TinySDXLConfig(unet_channels=(10, 16)), "unet_norm_groups"),
    ("build_flux_components", TinyFluxConfig(axes_dims_rope=(4, 4, 4)), "must sum to attention_head_dim"),
    ("build_flux_components", TinyFluxConfig(resolution=30), "resolution=30"),
    ("build_sd3_components", TinySD3Config(t5_dim=48), "t5_dim=48 must be at least"),
    ("build_sd3_components", TinySD3Config(vae_channels=(6, 16)), "vae_norm_groups"),
])
def test_bad_sizes_are_refused_with_the_fix(builder, config, match):
    with pytest.raises(ConfigError, match=match):
        getattr(tiny_xl, builder)(config)
