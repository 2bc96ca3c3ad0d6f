"""The diffusers shim on SDXL- and FLUX-style forwards, as train_text_to_image_lora_sdxl.py and
train_dreambooth_lora_flux.py run them (see examples/diffusers/PATCH_SDXL.md / PATCH_FLUX.md).

Tiny offline models (smplora_plugin.tiny_xl) with a peft LoRA; the forwards below are written here in
the scripts' structure: SDXL with two text encoders and the added text/time conditions, FLUX with packed
latents, flow-matching sigmas, guidance and image/text ids, unpacked before the loss. Checked: the loss
maps the attacker sees, the held-out forward built like the member one, the `robust` base forward (LoRA
off, no grad) on the privacy rows only with no random draw, and the privacy fraction with DreamBooth's
prior preservation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from smplora_plugin import PrivacyConfig  # noqa: E402
from smplora_plugin.errors import FeatureError  # noqa: E402
from smplora_plugin.integrations.diffusers import PrivacyRegularizer  # noqa: E402
from smplora_plugin.tiny_xl import TinyFluxConfig, TinySDXLConfig, build_flux_components, build_sdxl_components  # noqa: E402

from _helpers import lora_state, one_thread  # noqa: E402,F401  (one torch thread for this module)

GRID = 8
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "a photo of sks digit", "a drawing of a number"]


def make_reg(preset="paper", **kw):
    cfg = PrivacyConfig.preset(preset, feature_grid=GRID, hidden=(16, 8), seed=0, nonmember_every=1, **kw)
    return PrivacyRegularizer(cfg)


class BatchSizes:
    """Records the batch size of every forward of ``model`` (a forward pre-hook)."""

    def __init__(self, model, key):
        self.sizes = []
        self.handle = model.register_forward_pre_hook(
            lambda mod, args, kwargs: self.sizes.append(int((kwargs.get(key) if key in kwargs else args[0]).shape[0])),
            with_kwargs=True)


# ------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def sdxl():
    parts = build_sdxl_components(TinySDXLConfig())
    lora_state(parts["unet"], seed=1)
    return parts


def sdxl_batch(parts, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [parts[k]((PROMPTS * n)[:n], padding="max_length", truncation=True,
                    max_length=parts[k].model_max_length, return_tensors="pt").input_ids
           for k in ("tokenizer", "tokenizer_2")]
    return {"latents": torch.randn(n, 4, 16, 16, generator=g), "input_ids_one": ids[0], "input_ids_two": ids[1],
            "original_sizes": [(32, 32)] * n, "crop_top_lefts": [(0, 0)] * n}


def sdxl_predict(parts, reg, batch, n=None):
    """train_text_to_image_lora_sdxl.py's forward (latents given), plus the patch's base-prediction lines;
    ``n``: the privacy rows of a training batch (None: a held-out batch, all rows)."""
    unet, sched = parts["unet"], parts["scheduler"]
    model_input = batch["latents"]
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,)).long()
    alphas = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy_model_input = alphas.sqrt() * model_input + (1 - alphas).sqrt() * noise
    time_ids = torch.tensor([list(s + c + (32, 32)) for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])],
                            dtype=torch.float32)
    embeds = []
    with torch.no_grad():
        for enc, ids in ((parts["text_encoder"], batch["input_ids_one"]),
                         (parts["text_encoder_2"], batch["input_ids_two"])):
            out = enc(ids, output_hidden_states=True, return_dict=False)
            pooled, embeds = out[0], embeds + [out[-1][-2]]
    prompt_embeds = torch.cat(embeds, dim=-1)
    unet_added_conditions = {"time_ids": time_ids, "text_embeds": pooled}
    model_pred = unet(noisy_model_input, timesteps, prompt_embeds, added_cond_kwargs=unet_added_conditions,
                      return_dict=False)[0]
    target = noise
    base_pred = reg.reference(unet, n, lambda: unet(
        noisy_model_input[:n], timesteps[:n], prompt_embeds[:n],
        added_cond_kwargs={k: v[:n] for k, v in unet_added_conditions.items()}, return_dict=False,
    )[0])
    return model_pred, target, base_pred, (noisy_model_input, timesteps, prompt_embeds, unet_added_conditions)


def test_sdxl_paper_features_are_pooled_loss_maps(sdxl):
    reg = make_reg("paper")
    n = reg.privacy_rows(4)
    pred, target, base, _ = sdxl_predict(sdxl, reg, sdxl_batch(sdxl, 4, 0), n)
    assert base is None and pred.shape == (4, 4, 16, 16) and n == 4
    feats = reg.features(pred, target, rows=n)
    want = F.adaptive_avg_pool2d((pred.float() - target.float()).pow(2), GRID).flatten(1)
    assert feats.shape == (4, 4 * GRID * GRID) and torch.allclose(feats, want)
    assert feats.requires_grad                                   # the member features keep the graph


def test_sdxl_robust_base_forward_on_privacy_rows_only(sdxl):
    reg = make_reg("robust")                                      # privacy fraction 0.25
    sizes = BatchSizes(sdxl["unet"], "sample")
    batch = sdxl_batch(sdxl, 4, 1)
    try:
        torch.manual_seed(5)
        n = reg.privacy_rows(4)
        pred, target, base, inputs = sdxl_predict(sdxl, reg, batch, n)
        after = torch.get_rng_state()
    finally:
        sizes.handle.remove()
    assert sizes.sizes == [4, 1]                                  # training forward, then 1 = ceil(0.25 * 4) rows
    torch.manual_seed(5)                                          # the same forward without a base call ...
    pred_plain, _, none, _ = sdxl_predict(sdxl, make_reg("paper"), batch, 4)
    assert none is None and torch.equal(pred, pred_plain)
    assert torch.equal(after, torch.get_rng_state())              # ... leaves the generator where the base call did
    noisy, t, emb, cond = inputs
    unet = sdxl["unet"]
    with torch.no_grad():
        unet.disable_adapters()
        want = unet(noisy[:1], t[:1], emb[:1], added_cond_kwargs={k: v[:1] for k, v in cond.items()},
                    return_dict=False)[0]
        unet.enable_adapters()
    assert base.shape == (1, 4, 16, 16) and not base.requires_grad
    assert torch.allclose(base, want, atol=1e-6)                  # the LoRA was off ...
    assert not torch.allclose(base, pred[:1].detach(), atol=1e-4)  # ... and it matters
    feats = reg.features(pred, target, rows=n, reference=base)
    cal = (pred[:1].float() - target[:1]).pow(2) - (base - target[:1]).pow(2)
    assert feats.shape == (1, 4 * GRID * GRID)                    # loss maps are never pooled up: 16 > GRID
    assert torch.allclose(feats, F.adaptive_avg_pool2d(cal, GRID).flatten(1), atol=1e-6)
    with pytest.raises(FeatureError, match="privacy_rows"):
        reg.features(pred, target, rows=n, reference=torch.zeros_like(pred))   # a base forward on the whole batch


def test_sdxl_holdout_forward_is_the_member_forward(sdxl):
    reg = make_reg("robust")
    n = reg.privacy_rows(4)
    sizes = BatchSizes(sdxl["unet"], "sample")
    try:
        held = reg.nonmember_features(lambda b: sdxl_predict(sdxl, reg, b)[:3], batch=sdxl_batch(sdxl, 2, 2),
                                      rows=n, sync=True)
    finally:
        sizes.handle.remove()
    assert sizes.sizes == [2, 2]                                  # a held-out batch is used whole, base forward too
    assert held.shape == (2, 4 * GRID * GRID) and not held.requires_grad
    pred, target, base, _ = sdxl_predict(sdxl, reg, sdxl_batch(sdxl, 4, 3), n)
    member = reg.features(pred, target, rows=n, reference=base)
    loss = F.mse_loss(pred, target)
    out = reg.step(loss, member, held)
    assert torch.isfinite(out) and math.isclose(out.item(), loss.item(), rel_tol=1e-6)
    out.backward()
    grads = [p.grad for n, p in sdxl["unet"].named_parameters() if "lora" in n]
    assert grads and all(g is not None for g in grads)
    sdxl["unet"].zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ FLUX
@pytest.fixture(scope="module")
def flux():
    parts = build_flux_components(TinyFluxConfig())
    lora_state(parts["transformer"], seed=2)
    return parts


def flux_batch(parts, n, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = (PROMPTS * n)[:n]
    clip = parts["tokenizer"](prompts, padding="max_length", truncation=True,
                              max_length=parts["tokenizer"].model_max_length, return_tensors="pt").input_ids
    t5 = parts["tokenizer_2"](prompts, padding="max_length", truncation=True, max_length=32,
                              return_tensors="pt").input_ids
    return {"latents": torch.randn(n, 16, 16, 16, generator=g), "clip_ids": clip, "t5_ids": t5}


def flux_predict(parts, reg, batch, n=None, unpack=True):
    """train_dreambooth_lora_flux.py's forward (latents given), plus the patch's base-prediction lines;
    ``n``: the privacy rows of a training batch (None: a held-out batch, all rows)."""
    from diffusers import FluxPipeline

    transformer, sched = parts["transformer"], parts["scheduler"]
    with torch.no_grad():
        pooled_prompt_embeds = parts["text_encoder"](batch["clip_ids"]).pooler_output
        prompt_embeds = parts["text_encoder_2"](batch["t5_ids"])[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    model_input = batch["latents"]
    vae_scale_factor = 2
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(model_input.shape[0], model_input.shape[2] // 2,
                                                              model_input.shape[3] // 2, "cpu", torch.float32)
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    indices = (torch.rand(bsz) * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    sigmas = sched.sigmas[indices].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, bsz, 16, 16, 16)
    guidance = torch.full((bsz,), 3.5) if transformer.config.guidance_embeds else None
    model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                             txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
    target = noise - model_input
    if not unpack:
        return model_pred, FluxPipeline._pack_latents(target, bsz, 16, 16, 16)
    model_pred = FluxPipeline._unpack_latents(model_pred, height=16 * vae_scale_factor, width=16 * vae_scale_factor,
                                              vae_scale_factor=vae_scale_factor)
    base_pred = reg.reference(transformer, n, lambda: FluxPipeline._unpack_latents(transformer(
        hidden_states=packed[:n], timestep=timesteps[:n] / 1000,
        guidance=None if guidance is None else guidance[:n], pooled_projections=pooled_prompt_embeds[:n],
        encoder_hidden_states=prompt_embeds[:n], txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False,
    )[0], height=16 * vae_scale_factor, width=16 * vae_scale_factor, vae_scale_factor=vae_scale_factor))
    return model_pred, target, base_pred


def test_flux_features_are_unpacked_latent_maps(flux):
    assert flux["transformer"].config.guidance_embeds          # the guidance input is exercised
    reg = make_reg("paper")
    pred, target, base = flux_predict(flux, reg, flux_batch(flux, 2, 0), reg.privacy_rows(2))
    assert base is None and pred.shape == (2, 16, 16, 16)       # (B, C, H, W) latents, not (B, tokens, 64)
    feats = reg.features(pred, target, rows=2)
    want = F.adaptive_avg_pool2d((pred - target).pow(2), GRID).flatten(1)
    assert feats.shape == (2, 16 * GRID * GRID) and torch.allclose(feats, want)
    packed_pred, packed_target = flux_predict(flux, make_reg("paper"), flux_batch(flux, 2, 0), unpack=False)
    assert packed_pred.shape == (2, 64, 64)
    with pytest.raises(FeatureError, match="_unpack_latents"):
        make_reg("paper").features(packed_pred, packed_target, rows=2)
    with pytest.raises(FeatureError, match="_unpack_latents"):
        make_reg("paper").nonmember_features(lambda b: (packed_pred.detach(), packed_target), batch={}, rows=2,
                                             sync=True)


def test_flux_dreambooth_prior_preservation_rows(flux):
    """Instance rows first, then class rows: the privacy rows and the base forward come from the instance half."""
    reg = make_reg("robust", privacy_fraction=0.5)
    sizes = BatchSizes(flux["transformer"], "hidden_states")
    batch = flux_batch(flux, 8, 1)                                 # 4 instance + 4 class images
    n = reg.privacy_rows(8, with_prior_preservation=True)
    try:
        pred, target, base = flux_predict(flux, reg, batch, n)
    finally:
        sizes.handle.remove()
    assert n == 2 and sizes.sizes == [8, 2]
    inst_pred, _ = torch.chunk(pred, 2, dim=0)
    inst_target, _ = torch.chunk(target, 2, dim=0)
    feats = reg.features(inst_pred, inst_target, rows=n, reference=base)   # 2 rows of the instance half
    assert feats.shape == (2, 16 * GRID * GRID)
    with pytest.raises(FeatureError, match="odd size"):
        reg.privacy_rows(7, with_prior_preservation=True)
    # the held-out batch has no class images: used whole even with the prior-preservation flag
    sizes = BatchSizes(flux["transformer"], "hidden_states")
    try:
        held = reg.nonmember_features(lambda b: flux_predict(flux, reg, b), batch=flux_batch(flux, 3, 2), rows=n,
                                      sync=True)
    finally:
        sizes.handle.remove()
    assert sizes.sizes == [3, 3] and held.shape == (3, 16 * GRID * GRID)


def test_flux_robust_base_forward_draws_nothing(flux):
    reg = make_reg("robust")
    torch.manual_seed(7)
    pred, target, base = flux_predict(flux, reg, flux_batch(flux, 4, 3), reg.privacy_rows(4))
    after_training = torch.get_rng_state()
    torch.manual_seed(7)
    ref = make_reg("paper")                                        # same forward without the base call
    pred_plain, _, none = flux_predict(flux, ref, flux_batch(flux, 4, 3), 4)
    assert none is None and torch.equal(after_training, torch.get_rng_state())
    assert torch.equal(pred, pred_plain) and base.shape == (1, 16, 16, 16)
    assert not torch.allclose(base, pred[:1].detach(), atol=1e-4)   # LoRA off in the base forward
    assert reg.features(pred, target, rows=1, reference=base).shape == (1, 16 * GRID * GRID)
