"""Tiny SDXL, FLUX and SD3 pipelines built offline (random, seeded) for tests and examples.

The companions of :mod:`smplora_plugin.tiny_sd` for the other architectures LoRAs are trained on:

- :func:`build_sdxl_pipeline`: a ``StableDiffusionXLPipeline``: a UNet with SDXL's added conditions
  (``addition_embed_type="text_time"``: pooled text embeds plus the six size/crop time ids), a
  ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` (their penultimate hidden states concatenated
  as the cross-attention context), an ``AutoencoderKL`` and SDXL's Euler scheduler;
- :func:`build_flux_pipeline`: a ``FluxPipeline``: a ``FluxTransformer2DModel`` (one double-stream and
  one single-stream block by default), a ``CLIPTextModel`` (pooled prompt), a ``T5EncoderModel``
  (sequence prompt), a 16-channel ``AutoencoderKL`` and a ``FlowMatchEulerDiscreteScheduler``;
- :func:`build_sd3_pipeline`: a ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` with two
  ``CLIPTextModelWithProjection`` and a ``T5EncoderModel``.

The CLIP tokenizers are :func:`smplora_plugin.tiny_sd.build_tokenizer`; the T5 tokenizer is a
``tokenizers`` Unigram model whose pieces are written here (:func:`build_t5_tokenizer`). The
``save_tiny_*_pipeline`` functions write diffusers folders that load with ``from_pretrained(folder)``
fully offline (``HF_HUB_OFFLINE=1``), plus a ``tiny_*_config.json`` with the sizes used.

diffusers and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .errors import ConfigError
from .tiny_sd import DEFAULT_WORDS, build_tokenizer

PathLike = Union[str, "os.PathLike[str]"]

#: Characters the tiny T5 tokenizer knows as single pieces (anything else is ``<unk>``).
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/"


# ------------------------------------------------------------------------------------- configs
@dataclass
class TinySDXLConfig:
    """Sizes of the tiny SDXL pipeline (32 px images, 16 px latents by default).

    The UNet's cross-attention width is ``text_dim + text_dim_2`` (the two encoders' hidden states are
    concatenated, as in SDXL); its added-condition input is ``6 * addition_time_embed_dim + projection_dim``
    (six time ids and the second encoder's projected pooled output).
    """

    resolution: int = 32
    unet_channels: Tuple[int, ...] = (16, 32)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 8
    attention_head_dim: int = 8
    addition_time_embed_dim: int = 8
    vae_channels: Tuple[int, ...] = (8, 16)
    vae_norm_groups: int = 4
    text_dim: int = 32
    text_dim_2: int = 32
    projection_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = 16
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    words: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)
    seed: int = 0


@dataclass
class TinyFluxConfig:
    """Sizes of the tiny FLUX pipeline (32 px images, 16x16x16 latents packed to 8x8 tokens of 64).

    The transformer's width is ``num_attention_heads * attention_head_dim``; ``axes_dims_rope`` must sum
    to ``attention_head_dim``. ``guidance_embeds=True`` is FLUX.1-dev's guidance-distilled layout
    (``False``: FLUX.1-schnell's).
    """

    resolution: int = 32
    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: Tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = True
    vae_channels: Tuple[int, ...] = (8, 16)
    vae_norm_groups: int = 4
    latent_channels: int = 16
    clip_dim: int = 32
    clip_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = 16
    t5_dim: int = 32
    t5_layers: int = 1
    t5_heads: int = 4
    t5_ff: int = 64
    t5_max_length: int = 32
    shift: float = 3.0
    words: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)
    seed: int = 0


@dataclass
class TinySD3Config:
    """Sizes of the tiny SD3 pipeline (32 px images, 16-channel 16x16 latents in 2x2 patches).

    The two CLIP encoders' hidden states are concatenated and zero-padded to ``t5_dim`` (so
    ``t5_dim >= text_dim + text_dim_2``); the pooled input is ``2 * projection_dim``.
    """

    resolution: int = 32
    patch_size: int = 2
    num_layers: int = 1
    attention_head_dim: int = 8
    num_attention_heads: int = 4
    vae_channels: Tuple[int, ...] = (8, 16)
    vae_norm_groups: int = 4
    latent_channels: int = 16
    text_dim: int = 32
    text_dim_2: int = 32
    projection_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = 16
    t5_dim: int = 64
    t5_layers: int = 1
    t5_heads: int = 4
    t5_ff: int = 64
    t5_max_length: int = 32
    shift: float = 3.0
    words: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)
    seed: int = 0


# ------------------------------------------------------------------------------------- T5 tokenizer
def t5_pieces(words: Iterable[str] = DEFAULT_WORDS, chars: str = T5_CHARS) -> List[Tuple[str, float]]:
    """The Unigram pieces and log-scores of the tiny T5 tokenizer.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` (T5's layout), then the word-start mark ``▁``, one piece
    ``▁word`` per word (score -1, so a known word is one token), then every character alone and after
    ``▁`` (score -5 and -6, so unknown words are spelled out).
    """
    pieces: List[Tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    seen = {p for p, _ in pieces}
    for word in dict.fromkeys(words):
        if "▁" + word not in seen:
            seen.add("▁" + word)
            pieces.append(("▁" + word, -1.0))
    for ch in chars:
        for piece, score in (("▁" + ch, -5.0), (ch, -6.0)):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    return pieces


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 32):
    """A T5 tokenizer (transformers' ``T5TokenizerFast``) over :func:`t5_pieces`, built without downloads."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_pieces(words), extra_ids=0, model_max_length=int(max_length))


# ------------------------------------------------------------------------------------- shared parts
def _clip(tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int, max_length: int,
          projection_dim: int, with_projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(tokenizer, *, dim: int, layers: int, heads: int, ff: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _vae(*, channels: Tuple[int, ...], groups: int, latent_channels: int, resolution: int, seed: int,
         scaling_factor: float, shift_factor: Optional[float] = None, quant_conv: bool = True):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=groups, sample_size=resolution,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _eval(parts: Dict[str, object]) -> Dict[str, object]:
    """Models in eval mode, as ``from_pretrained`` returns them (a built and a reloaded pipeline then agree)."""
    for part in parts.values():
        if hasattr(part, "eval") and hasattr(part, "parameters"):
            part.eval()
    return parts


def _check_divisible(name: str, value: int, divisor: int, fix: str) -> None:
    if divisor <= 0 or value % divisor:
        raise ConfigError(f"{name}={value} must be divisible by {divisor}; {fix}.")


def _check_common(cfg, patch: int) -> None:
    """Resolution against the VAE (and UNet or patch) down-sampling, and widths against norm groups."""
    vae_scale = 2 ** (len(cfg.vae_channels) - 1)
    _check_divisible("resolution", cfg.resolution, vae_scale * patch,
                     f"the VAE down-samples by {vae_scale} and the denoiser by {patch}; use e.g. 32")
    if any(w % cfg.vae_norm_groups for w in cfg.vae_channels):
        raise ConfigError(f"every width in vae_channels={tuple(cfg.vae_channels)} must be divisible by "
                         f"vae_norm_groups={cfg.vae_norm_groups}.")


def _save(pipe, folder: PathLike, cfg, name: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    meta = asdict(cfg)
    meta["words"] = list(cfg.words)
    (folder / f"tiny_{name}_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


# ------------------------------------------------------------------------------------- SDXL
def _check_sdxl(cfg: TinySDXLConfig) -> None:
    _check_common(cfg, 2 ** (len(cfg.unet_channels) - 1))
    if any(w % cfg.unet_norm_groups for w in cfg.unet_channels):
        raise ConfigError(f"every width in unet_channels={tuple(cfg.unet_channels)} must be divisible by "
                         f"unet_norm_groups={cfg.unet_norm_groups}.")
    for name in ("text_dim", "text_dim_2"):
        _check_divisible(name, getattr(cfg, name), cfg.text_heads, "or change text_heads")


def build_sdxl_components(config: Optional[TinySDXLConfig] = None) -> Dict[str, object]:
    """UNet (``text_time`` added conditions), VAE, two CLIP text encoders and tokenizers, Euler scheduler."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    cfg = config or TinySDXLConfig()
    _check_sdxl(cfg)
    tokenizer = build_tokenizer(cfg.words, cfg.max_length)
    tokenizer_2 = build_tokenizer(cfg.words, cfg.max_length)
    n = len(cfg.unet_channels)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_dim + cfg.text_dim_2, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.unet_norm_groups, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.projection_dim,
    )
    vae = _vae(channels=cfg.vae_channels, groups=cfg.vae_norm_groups, latent_channels=4, resolution=cfg.resolution,
               seed=cfg.seed + 1, scaling_factor=0.13025)
    text = dict(layers=cfg.text_layers, heads=cfg.text_heads, intermediate=cfg.text_intermediate,
                max_length=cfg.max_length, projection_dim=cfg.projection_dim)
    text_encoder = _clip(tokenizer, hidden=cfg.text_dim, with_projection=False, seed=cfg.seed + 2, **text)
    text_encoder_2 = _clip(tokenizer_2, hidden=cfg.text_dim_2, with_projection=True, seed=cfg.seed + 3, **text)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type=cfg.prediction_type, steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )
    return _eval(dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                      tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler))


def build_sdxl_pipeline(config: Optional[TinySDXLConfig] = None):
    """A ``StableDiffusionXLPipeline`` (no watermarker) from :func:`build_sdxl_components`."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**build_sdxl_components(config), add_watermarker=False)


def save_tiny_sdxl_pipeline(folder: PathLike, config: Optional[TinySDXLConfig] = None) -> Path:
    """Build the tiny SDXL pipeline and save it in diffusers format (plus ``tiny_sdxl_config.json``)."""
    cfg = config or TinySDXLConfig()
    return _save(build_sdxl_pipeline(cfg), folder, cfg, "sdxl")


# ------------------------------------------------------------------------------------- FLUX
def _check_flux(cfg: TinyFluxConfig) -> None:
    _check_common(cfg, 2)  # latents are packed in 2x2 patches
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
        raise ConfigError(f"axes_dims_rope={tuple(cfg.axes_dims_rope)} must sum to attention_head_dim="
                         f"{cfg.attention_head_dim} (the rotary embedding covers each head).")
    _check_divisible("clip_dim", cfg.clip_dim, cfg.text_heads, "or change text_heads")
    _check_divisible("t5_dim", cfg.t5_dim, cfg.t5_heads, "or change t5_heads")


def build_flux_components(config: Optional[TinyFluxConfig] = None) -> Dict[str, object]:
    """Transformer, 16-channel VAE, CLIP and T5 encoders with tokenizers, flow-matching Euler scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    cfg = config or TinyFluxConfig()
    _check_flux(cfg)
    tokenizer = build_tokenizer(cfg.words, cfg.max_length)
    tokenizer_2 = build_t5_tokenizer(cfg.words, cfg.t5_max_length)
    torch.manual_seed(cfg.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.t5_dim,
        pooled_projection_dim=cfg.clip_dim, guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )
    vae = _vae(channels=cfg.vae_channels, groups=cfg.vae_norm_groups, latent_channels=cfg.latent_channels,
               resolution=cfg.resolution, seed=cfg.seed + 1, scaling_factor=0.3611, shift_factor=0.1159,
               quant_conv=False)
    text_encoder = _clip(tokenizer, hidden=cfg.clip_dim, layers=cfg.clip_layers, heads=cfg.text_heads,
                         intermediate=cfg.text_intermediate, max_length=cfg.max_length, projection_dim=cfg.clip_dim,
                         with_projection=False, seed=cfg.seed + 2)
    text_encoder_2 = _t5(tokenizer_2, dim=cfg.t5_dim, layers=cfg.t5_layers, heads=cfg.t5_heads, ff=cfg.t5_ff,
                         seed=cfg.seed + 3)
    latent_side = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    tokens = (latent_side // 2) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=cfg.shift, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=tokens, max_image_seq_len=16 * tokens,
    )
    return _eval(dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler))


def build_flux_pipeline(config: Optional[TinyFluxConfig] = None):
    """A ``FluxPipeline`` from :func:`build_flux_components`."""
    from diffusers import FluxPipeline

    return FluxPipeline(**build_flux_components(config))


def save_tiny_flux_pipeline(folder: PathLike, config: Optional[TinyFluxConfig] = None) -> Path:
    """Build the tiny FLUX pipeline and save it in diffusers format (plus ``tiny_flux_config.json``)."""
    cfg = config or TinyFluxConfig()
    return _save(build_flux_pipeline(cfg), folder, cfg, "flux")


# ------------------------------------------------------------------------------------- SD3
def _check_sd3(cfg: TinySD3Config) -> None:
    _check_common(cfg, cfg.patch_size)
    if cfg.t5_dim < cfg.text_dim + cfg.text_dim_2:
        raise ConfigError(f"t5_dim={cfg.t5_dim} must be at least text_dim + text_dim_2 = "
                         f"{cfg.text_dim + cfg.text_dim_2} (SD3 zero-pads the CLIP states to the T5 width).")
    for name in ("text_dim", "text_dim_2"):
        _check_divisible(name, getattr(cfg, name), cfg.text_heads, "or change text_heads")
    _check_divisible("t5_dim", cfg.t5_dim, cfg.t5_heads, "or change t5_heads")


def build_sd3_components(config: Optional[TinySD3Config] = None) -> Dict[str, object]:
    """MMDiT transformer, 16-channel VAE, two CLIP (with projection) and one T5 encoder, flow-matching scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    cfg = config or TinySD3Config()
    _check_sd3(cfg)
    tokenizer = build_tokenizer(cfg.words, cfg.max_length)
    tokenizer_2 = build_tokenizer(cfg.words, cfg.max_length)
    tokenizer_3 = build_t5_tokenizer(cfg.words, cfg.t5_max_length)
    latent_side = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    torch.manual_seed(cfg.seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.t5_dim,
        caption_projection_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        pooled_projection_dim=2 * cfg.projection_dim, out_channels=cfg.latent_channels,
        pos_embed_max_size=latent_side // cfg.patch_size,
    )
    vae = _vae(channels=cfg.vae_channels, groups=cfg.vae_norm_groups, latent_channels=cfg.latent_channels,
               resolution=cfg.resolution, seed=cfg.seed + 1, scaling_factor=1.5305, shift_factor=0.0609,
               quant_conv=False)
    text = dict(layers=cfg.text_layers, heads=cfg.text_heads, intermediate=cfg.text_intermediate,
                max_length=cfg.max_length, projection_dim=cfg.projection_dim, with_projection=True)
    text_encoder = _clip(tokenizer, hidden=cfg.text_dim, seed=cfg.seed + 2, **text)
    text_encoder_2 = _clip(tokenizer_2, hidden=cfg.text_dim_2, seed=cfg.seed + 3, **text)
    text_encoder_3 = _t5(tokenizer_3, dim=cfg.t5_dim, layers=cfg.t5_layers, heads=cfg.t5_heads, ff=cfg.t5_ff,
                         seed=cfg.seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    return _eval(dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                      tokenizer_3=tokenizer_3, scheduler=scheduler))


def build_sd3_pipeline(config: Optional[TinySD3Config] = None):
    """A ``StableDiffusion3Pipeline`` from :func:`build_sd3_components`."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**build_sd3_components(config))


def save_tiny_sd3_pipeline(folder: PathLike, config: Optional[TinySD3Config] = None) -> Path:
    """Build the tiny SD3 pipeline and save it in diffusers format (plus ``tiny_sd3_config.json``)."""
    cfg = config or TinySD3Config()
    return _save(build_sd3_pipeline(cfg), folder, cfg, "sd3")
