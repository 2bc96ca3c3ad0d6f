"""The audit on SDXL and flow-matching (FLUX, SD3) LoRAs made here on the tiny offline pipelines."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin import cli  # noqa: E402
from smplora_plugin.audit import AuditConfig, ScoreContext, load_lora_target  # noqa: E402
from smplora_plugin.audit.attacks import DEFAULT_ATTACKS  # noqa: E402
from smplora_plugin.audit.flow import FlowMatchTarget, flow_matching_loss, flow_sigmas  # noqa: E402

from _helpers import TINY_AUDIT, lora_state, one_thread  # noqa: E402,F401
from _single_file import kohya_sdxl  # noqa: E402

SUITE = {**TINY_AUDIT, "secmi_t": [100], "clid_timesteps": [450], "clid_max_words": 4, "n_boot": 50}


def _transformer_lora(transformer, seed):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return get_peft_model_state_dict(transformer)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from smplora_plugin.tiny_sd import write_digit_images
    from smplora_plugin.tiny_xl import save_tiny_flux_pipeline, save_tiny_sd3_pipeline, save_tiny_sdxl_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("architectures")
    out = {"root": root}
    out["sdxl"] = save_tiny_sdxl_pipeline(root / "sdxl")
    unet = StableDiffusionXLPipeline.from_pretrained(out["sdxl"]).unet
    state = lora_state(unet, seed=2)
    StableDiffusionXLPipeline.save_lora_weights(str(root / "sdxl_lora"), unet_lora_layers=state)
    out["sdxl_lora"] = root / "sdxl_lora" / "pytorch_lora_weights.safetensors"
    save_file(kohya_sdxl(state, unet.config.layers_per_block), str(root / "sdxl_kohya.safetensors"))
    out["sdxl_kohya"] = root / "sdxl_kohya.safetensors"
    for kind, save, cls in (("flux", save_tiny_flux_pipeline, FluxPipeline),
                            ("sd3", save_tiny_sd3_pipeline, StableDiffusion3Pipeline)):
        out[kind] = save(root / kind)
        state = _transformer_lora(cls.from_pretrained(out[kind]).transformer, seed=3)
        cls.save_lora_weights(str(root / f"{kind}_lora"), transformer_lora_layers=state)
        out[f"{kind}_lora"] = root / f"{kind}_lora" / "pytorch_lora_weights.safetensors"
    write_digit_images(root / "members", n=8, start=0)
    write_digit_images(root / "nonmembers", n=8, start=8)
    torch.set_num_threads(threads)
    return out


def _audit(ws, kind, lora, out, attacks=None, config=SUITE):
    argv = ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws[kind]), "--lora", str(lora),
            "--members", str(ws["root"] / "members"), "--nonmembers", str(ws["root"] / "nonmembers"),
            "--out", str(out), "--config", json.dumps(config)]
    if attacks:
        argv += ["--attacks", ",".join(attacks)]
    assert cli.main(argv) == 0
    return json.loads((out / "report.json").read_text())


def _every_attack_accounted_for(rep):
    skipped = rep["info"].get("skipped_attacks", {})
    for name in DEFAULT_ATTACKS:
        assert name in rep["attacks"] or name in skipped, name
    for r in rep["attacks"].values():
        assert 0.0 <= r["auc"] <= 1.0 and np.isfinite(r["auc"])


# ----------------------------------------------------------------------------------------------- SDXL
def test_sdxl_target_conditions_like_the_pipeline(ws):
    from diffusers import StableDiffusionXLPipeline

    a = load_lora_target(ws["sdxl"], ws["sdxl_lora"])
    b = load_lora_target(ws["sdxl"], ws["sdxl_kohya"])
    assert a.sdxl and a.architecture == "sdxl"
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 250)
    caps = ["a handwritten digit 3", ""]
    c = a.condition(caps)
    on = a.eps(z, t, c)
    assert torch.allclose(on, b.eps(z, t, c), atol=1e-5)  # kohya (original-UNet names) = diffusers format
    assert (on - a.eps(z, t, c, adapter=False)).abs().max() > 1e-3
    # the same prediction from the pipeline's own prompt encoding and size conditioning
    pipe = StableDiffusionXLPipeline(vae=a.vae, text_encoder=a.text_encoder, text_encoder_2=a.text_encoder_2,
                                     tokenizer=a.tokenizer, tokenizer_2=a.tokenizer_2, unet=a.unet,
                                     scheduler=StableDiffusionXLPipeline.from_pretrained(ws["sdxl"]).scheduler,
                                     add_watermarker=False)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(caps, device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=embeds.dtype,
                                          text_encoder_projection_dim=a.text_encoder_2.config.projection_dim)
        ref = a.unet(z, t, encoder_hidden_states=embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}).sample
    assert torch.allclose(on, ref, atol=1e-5)


def test_audit_cli_on_an_sdxl_kohya_lora(ws, tmp_path):
    rep = _audit(ws, "sdxl", ws["sdxl_kohya"], tmp_path / "sdxl")
    _every_attack_accounted_for(rep)
    assert not rep["info"].get("skipped_attacks")  # every attack is defined for SDXL
    assert rep["info"]["architecture"] == "sdxl" and rep["info"]["resolution"] == 32


# ------------------------------------------------------------------------------------ flow matching
class _HandBuilt:
    """A known velocity field: ``v(x, s) = 0.5 x - s``, standing in for the transformer."""

    calls = 0

    def __call__(self, x, sigma, cond, *, adapter=True):
        _HandBuilt.calls += 1
        return 0.5 * x - sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) + (0.0 if adapter else 0.1)


def test_flow_matching_loss_on_a_hand_built_velocity_field(ws):
    target = load_lora_target(ws["sd3"], ws["sd3_lora"])
    assert isinstance(target, FlowMatchTarget) and target.shift == 3.0  # SD3's scheduler shift
    target.velocity = _HandBuilt()
    target.encode = lambda images: images.float()  # the hand-built field acts on these latents directly
    x0 = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    cfg = AuditConfig(timesteps=(0, 100, 500, 900), draws=2, seed=4)
    ctx = ScoreContext(target, x0, None, cfg, progress=False)
    grid = ctx._compute_grid(True)[0]  # (N, K, M)
    sig = flow_sigmas(1000, 3.0)
    for k, t in enumerate(ctx.timesteps):
        s = float(sig[t])
        assert math.isclose(s, 3 * (t / 1000) / (1 + 2 * (t / 1000)), rel_tol=1e-12)
        for m in range(2):
            e = ctx.noise[m].expand_as(x0)
            x = (1 - s) * x0 + s * e
            v_true = e - x0
            velocity_loss = (0.5 * x - s - v_true).pow(2).flatten(1).mean(1)  # the flow-matching loss, by hand
            assert np.allclose(grid[:, k, m], (1 - s) ** 2 * velocity_loss.double().numpy(), rtol=1e-5, atol=1e-7)
            fm = flow_matching_loss(target, x0, e, torch.full((3,), s), None)
            assert torch.allclose(fm, velocity_loss, rtol=1e-5, atol=1e-6)


def test_ddim_step_is_the_euler_step_of_the_flow_ode(ws):
    target = load_lora_target(ws["sd3"], ws["sd3_lora"])
    target.velocity = _HandBuilt()
    target.encode = lambda images: images.float()
    x0 = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ctx = ScoreContext(target, x0.float(), None, AuditConfig(draws=1), progress=False)
    sig = target.sigmas
    for s_idx, u_idx in ((100, 110), (400, 390), (0, 10)):
        s, u = float(sig[s_idx]), float(sig[u_idx])
        r_s, r_u = math.hypot(1 - s, s), math.hypot(1 - u, u)
        z = x0 / r_s  # a DDPM-coordinate point; x_s = r_s z
        e = ctx.eps(z.float(), s_idx, None, True, "test").double()
        stepped = ctx.ddim(z, s_idx, u_idx, e) * r_u  # back in flow coordinates
        x = r_s * z
        euler = x + (u - s) * (0.5 * x - s)
        assert torch.allclose(stepped, euler, atol=1e-5), (s_idx, u_idx)


def test_audit_cli_on_a_flux_lora(ws, tmp_path):
    rep = _audit(ws, "flux", ws["flux_lora"], tmp_path / "flux")
    _every_attack_accounted_for(rep)
    assert not rep["info"].get("skipped_attacks")
    assert rep["info"]["architecture"] == "flux" and "velocity loss" in rep["info"]["loss_parameterisation"]


def test_flux_target_packs_latents_and_switches_the_lora(ws):
    target = load_lora_target(ws["flux"], ws["flux_lora"])
    assert target.shift == 1.0  # FLUX's scheduler shifts by resolution at sampling time: unshifted training levels
    assert target.max_sequence_length == 32  # capped at the tiny T5 tokenizer's length
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = target.encode(x)
    assert z.shape == (2, 16, 16, 16)
    c = target.condition(["a handwritten digit 3", ""])
    t = torch.full((2,), 300)
    on, off = target.eps(z, t, c), target.eps(z, t, c, adapter=False)
    assert (on - off).abs().max() > 1e-3 and torch.equal(target.eps(z, t, c), on)
    # one latent position changed moves the prediction there most: packing and unpacking line up
    z2 = z.clone()
    z2[:, :, 5, 9] += 3.0
    d = (target.eps(z2, t, c) - on).abs().sum(1)[0]
    assert tuple(int(i) for i in np.unravel_index(int(d.argmax()), d.shape)) in {(5, 9), (4, 8), (4, 9), (5, 8)}


def test_audit_cli_on_an_sd3_lora(ws, tmp_path):
    rep = _audit(ws, "sd3", ws["sd3_lora"], tmp_path / "sd3",
                 attacks=["loss", "loss_calibrated", "sima", "secmi", "pia", "clid", "gsa", "blind"])
    assert set(rep["attacks"]) == {"loss", "loss_calibrated", "sima", "secmi", "pia", "clid", "gsa", "blind"}
    assert rep["info"]["architecture"] == "sd3"


def test_kohya_flux_lora_equals_its_diffusers_form(ws, tmp_path):
    """sd-scripts' FLUX names (``lora_unet_double_blocks_0_img_attn_qkv``: q, k, v fused; alpha) load as the
    same LoRA."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    tr = FluxPipeline.from_pretrained(ws["flux"]).transformer
    D = tr.config.num_attention_heads * tr.config.attention_head_dim
    mlp = tr.transformer_blocks[0].ff.net[0].proj.out_features
    g = torch.Generator().manual_seed(9)
    r, alpha = 4, 2.0
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    kohya, diff = {}, {}
    plain = {"double_blocks_0_img_attn_proj": ("transformer_blocks.0.attn.to_out.0", D, D),
             "double_blocks_0_txt_attn_proj": ("transformer_blocks.0.attn.to_add_out", D, D),
             "double_blocks_0_img_mlp_0": ("transformer_blocks.0.ff.net.0.proj", D, mlp),
             "single_blocks_0_linear2": ("single_transformer_blocks.0.proj_out",
                                         D + tr.single_transformer_blocks[0].proj_mlp.out_features, D)}
    for name, (module, d_in, d_out) in plain.items():
        down, up = rnd(r, d_in), rnd(d_out, r)
        kohya.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                      f"lora_unet_{name}.alpha": torch.tensor(alpha)})
        diff.update({f"transformer.{module}.lora_A.weight": down * (alpha / r),
                     f"transformer.{module}.lora_B.weight": up})
    down, up = rnd(r, D), rnd(3 * D, r)
    kohya.update({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                  "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)})
    for i, p in enumerate("qkv"):
        diff.update({f"transformer.transformer_blocks.0.attn.to_{p}.lora_A.weight": down * (alpha / r),
                     f"transformer.transformer_blocks.0.attn.to_{p}.lora_B.weight": up[i * D:(i + 1) * D]})
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya_flux.safetensors"))
    save_file({k: v.contiguous() for k, v in diff.items()}, str(tmp_path / "diffusers_flux.safetensors"))
    a = load_lora_target(ws["flux"], tmp_path / "kohya_flux.safetensors")
    b = load_lora_target(ws["flux"], tmp_path / "diffusers_flux.safetensors")
    z = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 400)
    c = a.condition(["a handwritten digit 7", ""])
    on = a.eps(z, t, c)
    assert torch.allclose(on, b.eps(z, t, c), atol=1e-5)
    assert (on - a.eps(z, t, c, adapter=False)).abs().max() > 1e-3


def test_kohya_sd3_lora_is_refused_with_the_fix(ws, tmp_path):
    from safetensors.torch import save_file

    from smplora_plugin.audit import AuditError

    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.ones(4, 32),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.ones(96, 4)},
              str(tmp_path / "kohya_sd3.safetensors"))
    with pytest.raises(AuditError, match="kohya's .sd-scripts'. SD3 format.*diffusers/peft format"):
        load_lora_target(ws["sd3"], tmp_path / "kohya_sd3.safetensors")
