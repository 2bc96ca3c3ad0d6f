"""Build an offline test fixture for kohya sd-scripts' ``sdxl_train_network.py``: a randomly
initialised, full-size SDXL single-file checkpoint (bf16 on disk), the two offline CLIP
tokenizers sd-scripts looks up, and a few DreamBooth-layout image folders.

Nothing is downloaded. sd-scripts builds SDXL at a fixed size whatever the checkpoint holds
(its own UNet, about 2.6B parameters; CLIP ViT-L text encoder; OpenCLIP bigG text encoder; the
SD VAE), so the checkpoint has that size too (about 7 GB in bf16). The models are built here
with sd-scripts' own classes and written by sd-scripts' own saver
(``library.sdxl_model_util.save_stable_diffusion_checkpoint``), so the file is exactly what its
loader expects. Needs sd-scripts on ``sys.path`` (``--sd_scripts DIR`` or ``$SD_SCRIPTS_DIR``)
and about 9 GB of free RAM.

Usage (in the Python environment of your sd-scripts checkout)::

    python scripts/kohya/make_random_sdxl.py OUT_DIR --sd_scripts ~/sd-scripts [--images 6] [--seed 0]

Creates ``OUT_DIR/sdxl_random_bf16.safetensors`` (pass it as
``--pretrained_model_name_or_path``), ``OUT_DIR/tokenizers/{openai_clip-vit-large-patch14,
laion_CLIP-ViT-bigG-14-laion2B-39B-b160k}`` (pass ``--tokenizer_cache_dir OUT_DIR/tokenizers``),
and ``OUT_DIR/{train/5_tiny, holdout/1_tiny, reg/1_class}`` as in ``make_tiny_sd15.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_sd15 import make_images, make_tokenizer  # noqa: E402  - our sibling fixture script

CHECKPOINT = "sdxl_random_bf16.safetensors"
# the hub ids sd-scripts' SDXL tokenize strategy loads, as --tokenizer_cache_dir folder names
TOKENIZER_DIRS = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")

# The two SDXL text encoders as published (CLIP ViT-L/14 text tower; OpenCLIP ViT-bigG/14 text tower with
# projection). sd-scripts' loader builds these same shapes and refuses a checkpoint whose tensors differ.
TEXT_ENCODER_1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _check_sd_scripts(sd_dir: Path) -> None:
    if not (sd_dir / "library" / "sdxl_model_util.py").is_file():
        raise SystemExit(f"{sd_dir} is not an sd-scripts checkout with SDXL support (no library/sdxl_model_util.py); "
                         "pass --sd_scripts /path/to/sd-scripts or set SD_SCRIPTS_DIR.")


def _import_sd_scripts(sd_dir: Path):
    _check_sd_scripts(sd_dir)
    sys.path.insert(0, str(sd_dir))
    from library import model_util, sdxl_model_util, sdxl_original_unet

    return model_util, sdxl_model_util, sdxl_original_unet


def make_checkpoint(path: Path, sd_dir: Path, seed: int) -> int:
    """Write a random SDXL checkpoint with sd-scripts' saver; returns the number of parameters."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_util, sdxl_model_util, sdxl_original_unet = _import_sd_scripts(sd_dir)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: half the RAM of fp32, no conversion copy
    try:
        unet = sdxl_original_unet.SdxlUNet2DConditionModel()
        te1 = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
        vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    finally:
        torch.set_default_dtype(previous)
    models = (unet, te1, te2, vae)
    for m in models:
        m.to(torch.bfloat16)
    n_params = sum(p.numel() for m in models for p in m.parameters())
    logit_scale = torch.tensor(4.6052, dtype=torch.bfloat16)  # log(100), CLIP's usual value
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_dtype=None: the tensors are already bf16, so the saver stores them without a second copy in RAM
    meta = {"smplora.fixture": "random SDXL, seed %d" % seed}
    sdxl_model_util.save_stable_diffusion_checkpoint(str(path), te1, te2, unet, 0, 0, None, vae, logit_scale, meta,
                                                     save_dtype=None)
    return n_params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--sd_scripts", type=Path, default=os.environ.get("SD_SCRIPTS_DIR"),
                   help="sd-scripts checkout (default: $SD_SCRIPTS_DIR)")
    p.add_argument("--images", type=int, default=6, help="training images")
    p.add_argument("--holdout", type=int, default=4, help="held-out (non-member) images")
    p.add_argument("--reg", type=int, default=2, help="regularisation (class) images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_model", action="store_true", help="only the tokenizers and images")
    a = p.parse_args(argv)
    if a.sd_scripts is None and not a.skip_model:
        p.error("pass --sd_scripts /path/to/sd-scripts or set SD_SCRIPTS_DIR")
    if not a.skip_model:
        _check_sd_scripts(a.sd_scripts.expanduser().resolve())   # before anything is written
    out: Path = a.out
    for name in TOKENIZER_DIRS:
        make_tokenizer(out / "tokenizers" / name)
    make_images(out / "train" / "5_tiny", a.images, a.seed, "a tiny photo")
    make_images(out / "holdout" / "1_tiny", a.holdout, a.seed + 1000, "a tiny photo")
    make_images(out / "reg" / "1_class", a.reg, a.seed + 2000, "a photo")
    if not a.skip_model:
        n = make_checkpoint(out / CHECKPOINT, a.sd_scripts.expanduser().resolve(), a.seed)
        print(f"wrote {out / CHECKPOINT} ({n / 1e9:.2f}B parameters, bf16)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
