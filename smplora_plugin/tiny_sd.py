"""A tiny Stable-Diffusion-style pipeline and a digits image folder, built offline for tests and examples.

Everything is built from small configs with seeded random initialisation: no weights or datasets are
downloaded. The pipeline is saved in diffusers' format (``model_index.json`` plus ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) so that any diffusers training script accepts it as
``--pretrained_model_name_or_path``. The CLIP tokenizer's vocabulary and BPE merges are written here.

diffusers, transformers, scikit-learn and Pillow are imported lazily, inside the functions, so the core
package imports without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

#: Words the tokenizer knows as whole tokens (anything else is split into byte-level characters).
DEFAULT_WORDS: Tuple[str, ...] = (
    "a", "an", "the", "of", "photo", "picture", "image", "handwritten", "digit", "number", "drawing", "in", "style",
    "sks", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class TinySDConfig:
    """Sizes of the tiny pipeline. Defaults give ~0.3 M UNet parameters and 32 px images (16 px latents).

    ``unet_channels`` / ``vae_channels`` are the per-resolution block widths; the VAE downsamples by
    ``2 ** (len(vae_channels) - 1)``. ``cross_attention_dim`` is the text-encoder width.
    """

    resolution: int = 32
    unet_channels: Tuple[int, ...] = (16, 32)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 8
    attention_head_dim: int = 8
    vae_channels: Tuple[int, ...] = (8, 16)
    vae_norm_groups: int = 4
    latent_channels: int = 4
    cross_attention_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = 16
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    words: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_WORDS)
    seed: int = 0


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16):
    """A ``CLIPTokenizer`` whose vocabulary and merges are built here.

    The vocabulary holds every byte-level character (alone and with the end-of-word mark ``</w>``),
    one merge chain per word in ``words`` (merged left to right), and the two special tokens.
    """
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        write_tokenizer_files(tmp, words)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=int(max_length))


def write_tokenizer_files(folder: PathLike, words: Iterable[str] = DEFAULT_WORDS) -> Tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny CLIP BPE tokenizer to ``folder``."""
    vocab, merges = _clip_vocab_and_merges(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return vocab_path, merges_path


def _byte_chars() -> List[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _clip_vocab_and_merges(words: Iterable[str]) -> Tuple[Dict[str, int], List[str]]:
    symbols = _byte_chars()
    tokens: List[str] = list(symbols) + [s + "</w>" for s in symbols]
    merges: List[str] = []
    seen_merges = set()
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_components(config: Optional[TinySDConfig] = None) -> Dict[str, object]:
    """UNet, VAE, text encoder, tokenizer and DDPM scheduler of a tiny SD pipeline (random, seeded)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config or TinySDConfig()
    _check_config(cfg)
    tokenizer = build_tokenizer(cfg.words, cfg.max_length)
    n_blocks = len(cfg.unet_channels)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers_per_block,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.unet_norm_groups,
    )
    torch.manual_seed(cfg.seed + 1)
    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.resolution,
    )
    torch.manual_seed(cfg.seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.cross_attention_dim,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.cross_attention_dim,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type, clip_sample=False, steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_pipeline(config: Optional[TinySDConfig] = None):
    """A ``StableDiffusionPipeline`` (no safety checker) from :func:`build_components`."""
    from diffusers import StableDiffusionPipeline

    parts = build_components(config)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(folder: PathLike, config: Optional[TinySDConfig] = None) -> Path:
    """Build the tiny pipeline and save it in diffusers format to ``folder`` (plus ``tiny_sd_config.json``)."""
    cfg = config or TinySDConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    meta = asdict(cfg)
    meta["words"] = list(cfg.words)
    (folder / "tiny_sd_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def _check_config(cfg: TinySDConfig) -> None:
    if cfg.resolution % 2 ** (len(cfg.vae_channels) - 1 + len(cfg.unet_channels) - 1):
        raise ConfigError(
            f"resolution={cfg.resolution} must be divisible by 2 ** (len(vae_channels) + len(unet_channels) - 2) "
            "so every down-sampling is exact; use e.g. 32."
        )
    for name, widths, groups in (("unet_channels", cfg.unet_channels, cfg.unet_norm_groups),
                                 ("vae_channels", cfg.vae_channels, cfg.vae_norm_groups)):
        if any(w % groups for w in widths):
            raise ConfigError(f"every width in {name}={tuple(widths)} must be divisible by its norm groups ({groups}).")
    if cfg.cross_attention_dim % cfg.text_heads:
        raise ConfigError(
            f"cross_attention_dim={cfg.cross_attention_dim} must be divisible by text_heads={cfg.text_heads}.")


# ---------------------------------------------------------------------------------------- digits
def unique_digit_indices() -> List[int]:
    """Indices of scikit-learn's digits whose 8x8 pixels are unique (first occurrence of each image).

    Rendering duplicates would give byte-identical PNG files in two sets, which the holdout
    overlap check (rightly) rejects.
    """
    from sklearn.datasets import load_digits

    images = load_digits().images
    seen, out = set(), []
    for i, img in enumerate(images):
        key = img.astype("uint8").tobytes()
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def digit_caption(label: int) -> str:
    return f"a handwritten digit {int(label)}"


def write_digit_images(folder: PathLike, indices: Optional[Sequence[int]] = None, *, n: int = 16, start: int = 0,
                       size: int = 32, caption_files: bool = True, metadata_jsonl: bool = True,
                       prefix: str = "digit") -> List[Path]:
    """Render scikit-learn digits to RGB PNG files with captions (``"a handwritten digit 3"``).

    Args:
        folder: the image folder to create (files ``{prefix}_{index:04d}.png``).
        indices: indices into ``sklearn.datasets.load_digits()``; by default ``n`` unique images
            starting at position ``start`` of :func:`unique_digit_indices` (so disjoint
            ``start`` ranges give disjoint, content-distinct sets).
        size: output side in pixels (nearest-neighbour upscaling of the 8x8 digit).
        caption_files: write ``{name}.txt`` next to each image (kohya layout).
        metadata_jsonl: write ``metadata.jsonl`` with ``file_name``/``text`` (Hugging Face imagefolder layout).
    Returns:
        the image paths, in order.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    if indices is None:
        pool = unique_digit_indices()
        if start < 0 or start + n > len(pool):
            raise ConfigError(f"start={start}, n={n} asks for images beyond the {len(pool)} unique digits.")
        indices = pool[start:start + n]
    if size < 8 or size % 8:
        raise ConfigError(f"size={size} must be a positive multiple of 8 (the digits are 8x8).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for idx in indices:
        img = digits.images[int(idx)]  # values 0..16, white ink on black
        pixels = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        pixels = np.kron(pixels, np.ones((size // 8, size // 8), dtype=np.uint8))
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)
        name = f"{prefix}_{int(idx):04d}.png"
        path = folder / name
        Image.fromarray(rgb, mode="RGB").save(path, format="PNG")
        caption = digit_caption(int(digits.target[int(idx)]))
        if caption_files:
            (folder / f"{prefix}_{int(idx):04d}.txt").write_text(caption + "\n")
        rows.append({"file_name": name, "text": caption})
        paths.append(path)
    if metadata_jsonl:
        with open(folder / "metadata.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return paths
