"""Build offline test fixtures for kohya sd-scripts' ``flux_train_network.py`` and
``sd3_train_network.py``: random-weight models (bf16 on disk) at the smallest size sd-scripts'
loaders accept, the offline tokenizers they look up, and a few DreamBooth-layout image folders.

What sd-scripts reads from a checkpoint and what it builds at a fixed size (main 48d368fa):

- FLUX (``flux_utils.load_flow_model``): the double / single block counts come from the state dict
  (``analyze_checkpoint_state``), the widths are fixed (hidden 3072), so 1 + 1 blocks is the smallest
  model; dev vs schnell is read from the ``guidance_in`` keys. The AutoEncoder and CLIP-L are fixed.
- SD3 (``sd3_utils.analyze_state_dict_state``): the MMDiT depth comes from ``x_embedder``'s width
  (64 per block), the positional table and the context width from their tensors, so depth 2 is a
  hidden size of 128. CLIP-L, CLIP-G and the SD3 VAE are fixed.
- T5-XXL (both): ``flux_utils.load_t5xxl`` builds the full 24-layer, 4.7B-parameter encoder from a
  fixed config and loads the file with ``strict=False``: layers missing from the file stay
  unallocated and fail at the first forward, so the T5 file must be full size (9.5 GB in bf16).

The models are built with sd-scripts' own classes and configs (the T5 and CLIP-L configs are taken
from the models sd-scripts' loaders build from an empty state dict), at run time: nothing of
sd-scripts is copied. Needs about 11 GB of free RAM (the T5) and 12 GB of disk.

Usage (in the Python environment of your sd-scripts checkout)::

    python scripts/kohya/make_random_flux_sd3.py OUT_DIR --sd_scripts ~/sd-scripts [--only flux|sd3]

Writes ``OUT_DIR/text_encoders/{clip_l,clip_g,t5xxl}.safetensors``, ``OUT_DIR/flux/{flux_1d1s,ae}.safetensors``,
``OUT_DIR/sd3/sd3_depth2.safetensors`` (MMDiT + VAE), ``OUT_DIR/tokenizers/`` (``--tokenizer_cache_dir``)
and ``OUT_DIR/{train/5_tiny, holdout/1_tiny, reg/1_class}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_sdxl import TEXT_ENCODER_2, TOKENIZER_DIRS  # noqa: E402  - CLIP-G = SDXL's second encoder
from make_tiny_sd15 import make_images, make_tokenizer  # noqa: E402

T5_TOKENIZER_DIR = "google_t5-v1_1-xxl"
SD3_DEPTH = 2
SD3_POS_EMBED_MAX = 64   # positional table of 64 x 64 patches: up to 1024 px at patch size 2


def make_t5_tokenizer(out: Path) -> None:
    """A T5TokenizerFast (unigram, one piece per character) with T5's special ids: pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)] + ["\u2581"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)
    fast.save_pretrained(str(out))


def _sd_scripts(sd_dir: Path):
    if not (sd_dir / "library" / "flux_utils.py").is_file():
        raise SystemExit(f"{sd_dir} is not an sd-scripts checkout with FLUX / SD3 support (no library/flux_utils.py); "
                         "pass --sd_scripts /path/to/sd-scripts or set SD_SCRIPTS_DIR.")
    sys.path.insert(0, str(sd_dir))


def _save(module_or_sd, path: Path, prefix: str = "") -> int:
    """Write a state dict tensor by tensor (sd-scripts' mem_eff_save_file: no second copy in RAM)."""
    from library.safetensors_utils import mem_eff_save_file

    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    sd = {prefix + k: v.contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    mem_eff_save_file(sd, str(path), {"smplora.fixture": "random weights"})
    return sum(v.numel() for v in sd.values())


def _bf16(build):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return build().to(torch.bfloat16)
    finally:
        torch.set_default_dtype(previous)


def make_text_encoders(out: Path, with_clip_g: bool) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from library import flux_utils

    # sd-scripts' loaders, given an empty state dict, return their fixed-size models (unallocated): take the configs
    t5_config = flux_utils.load_t5xxl(None, torch.bfloat16, "cpu", state_dict={}).config
    clip_l_config = flux_utils.load_clip_l(None, torch.bfloat16, "cpu", state_dict={}).config
    n = _save(_bf16(lambda: CLIPTextModel._from_config(clip_l_config)), out / "clip_l.safetensors")
    print(f"CLIP-L: {n / 1e6:.0f}M parameters")
    if with_clip_g:
        n = _save(_bf16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))),
                  out / "clip_g.safetensors")
        print(f"CLIP-G: {n / 1e6:.0f}M parameters")
    t5 = _bf16(lambda: T5EncoderModel(t5_config))
    n = _save(t5, out / "t5xxl.safetensors")
    del t5
    print(f"T5-XXL: {n / 1e9:.2f}B parameters")


def make_flux(out: Path) -> None:
    from library import flux_models

    spec = flux_models.configs["dev"]
    params = replace(spec.params, depth=1, depth_single_blocks=1)
    n = _save(_bf16(lambda: flux_models.Flux(params)), out / "flux_1d1s.safetensors")
    print(f"FLUX (1 double + 1 single block): {n / 1e9:.2f}B parameters")
    _save(_bf16(lambda: flux_models.AutoEncoder(spec.ae_params)), out / "ae.safetensors")


def make_sd3(out: Path) -> None:
    import torch

    from library import sd3_models

    hidden = 64 * SD3_DEPTH
    params = sd3_models.SD3Params(
        patch_size=2, depth=SD3_DEPTH, num_patches=SD3_POS_EMBED_MAX ** 2, pos_embed_max_size=SD3_POS_EMBED_MAX,
        adm_in_channels=768 + 1280, qk_norm=None, x_block_self_attn_layers=[], context_embedder_in_features=4096,
        context_embedder_out_features=hidden, model_type="medium")
    sd = {}
    mmdit = _bf16(lambda: sd3_models.create_sd3_mmdit(params))
    sd.update({"model.diffusion_model." + k: v for k, v in mmdit.state_dict().items()})
    vae = sd3_models.SDVAE(torch.bfloat16, "cpu")
    sd.update({"first_stage_model." + k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()})
    n = _save(sd, out / f"sd3_depth{SD3_DEPTH}.safetensors")
    print(f"SD3 MMDiT depth {SD3_DEPTH} + VAE: {n / 1e6:.0f}M parameters")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--sd_scripts", type=Path, default=os.environ.get("SD_SCRIPTS_DIR"),
                   help="sd-scripts checkout (default: $SD_SCRIPTS_DIR)")
    p.add_argument("--only", choices=("flux", "sd3"), help="build one model family (default: both)")
    p.add_argument("--images", type=int, default=6, help="training images")
    p.add_argument("--holdout", type=int, default=4, help="held-out (non-member) images")
    p.add_argument("--reg", type=int, default=2, help="regularisation (class) images")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.sd_scripts is None:
        p.error("pass --sd_scripts /path/to/sd-scripts or set SD_SCRIPTS_DIR")
    _sd_scripts(a.sd_scripts.expanduser().resolve())
    import torch

    out: Path = a.out
    for name in TOKENIZER_DIRS:
        make_tokenizer(out / "tokenizers" / name)
    make_t5_tokenizer(out / "tokenizers" / T5_TOKENIZER_DIR)
    make_images(out / "train" / "5_tiny", a.images, a.seed, "a tiny photo")
    make_images(out / "holdout" / "1_tiny", a.holdout, a.seed + 1000, "a tiny photo")
    make_images(out / "reg" / "1_class", a.reg, a.seed + 2000, "a photo")
    torch.manual_seed(a.seed)
    if a.only in (None, "flux"):
        make_flux(out / "flux")
    if a.only in (None, "sd3"):
        make_sd3(out / "sd3")
    make_text_encoders(out / "text_encoders", with_clip_g=a.only in (None, "sd3"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
