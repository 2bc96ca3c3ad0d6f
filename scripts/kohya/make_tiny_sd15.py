"""Build an offline test fixture for kohya sd-scripts: a small SD1.5-style diffusers model,
an offline CLIP tokenizer, and a few DreamBooth-layout image folders.

Nothing is downloaded: every model is randomly initialised from a config written here.
sd-scripts converts a diffusers UNet into its own SD1.x UNet whose block widths are fixed
(320, 640, 1280, 1280), so the UNet keeps that layout (random init, about 0.8B parameters);
the text encoder, the VAE and the cross-attention width are tiny.

Usage (in the Python environment of your sd-scripts checkout)::

    python scripts/kohya/make_tiny_sd15.py OUT_DIR [--images 6] [--holdout 4] [--seed 0]

Creates ``OUT_DIR/model`` (diffusers format), ``OUT_DIR/tokenizers/openai_clip-vit-large-patch14``
(pass ``--tokenizer_cache_dir OUT_DIR/tokenizers``), ``OUT_DIR/train/5_tiny`` (training images
with ``.caption`` files), ``OUT_DIR/holdout/1_tiny`` (held-out images, disjoint by content) and
``OUT_DIR/reg/1_class`` (regularisation images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CROSS_DIM = 32  # text-encoder hidden size == UNet cross-attention width


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_tokenizer(out: Path) -> int:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character)."""
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    raw = out / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(out))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return len(vocab)


def make_model(out: Path, vocab_size: int, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      projection_dim=CROSS_DIM))
    te.save_pretrained(str(out / "text_encoder"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(str(out / "vae"))
    # SD1.x layout and widths (kohya rebuilds its own UNet with these fixed widths); small cross-attention.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=32,
    )
    unet.save_pretrained(str(out / "unet"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False).save_pretrained(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def make_images(folder: Path, n: int, seed: int, caption: str, size: int = 64) -> None:
    """``n`` distinct random-pattern PNGs with ``.caption`` files."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.NEAREST)
        img.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.caption").write_text(f"{caption} {i}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=6, help="training images")
    p.add_argument("--holdout", type=int, default=4, help="held-out (non-member) images")
    p.add_argument("--reg", type=int, default=2, help="regularisation (class) images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_model", action="store_true", help="only the tokenizer and images")
    a = p.parse_args(argv)
    out: Path = a.out
    vocab_size = make_tokenizer(out / "tokenizers" / "openai_clip-vit-large-patch14")
    make_images(out / "train" / "5_tiny", a.images, a.seed, "a tiny photo")
    make_images(out / "holdout" / "1_tiny", a.holdout, a.seed + 1000, "a tiny photo")
    make_images(out / "reg" / "1_class", a.reg, a.seed + 2000, "a photo")
    if not a.skip_model:
        make_model(out / "model", vocab_size, a.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
