"""Write a small random SD1.x-style checkpoint that ComfyUI's model detection accepts.

Usage::

    COMFYUI_DIR=/path/to/ComfyUI python scripts/comfyui/make_tiny_checkpoint.py OUT.safetensors [--seed 0]

ComfyUI detects SD1.x from the UNet's key shapes and its SD15 config fixes ``model_channels=320``
and ``context_dim=768``, but not the depth, so the UNet here is the smallest such shape: one
resolution level (``channel_mult=[1]``), one res block, one transformer block in and out, no
down-sampling. The text encoder must be a whole CLIP-L (ComfyUI builds SD1's text encoder from a
fixed config, and missing layers would stay uninitialised), so it dominates the size. The VAE is
a TAESD-shaped one (ComfyUI recognises ``taesd_decoder.*`` keys), far smaller than SD's VAE. All
weights are seeded normal draws (fp16 on disk); the checkpoint denoises nothing, it only lets a
real ComfyUI run the nodes' code paths end to end. The script builds the modules with ComfyUI's
own classes at run time (nothing of ComfyUI is copied) and checks that ComfyUI detects the result
as SD15.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
            num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
            transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
            use_linear_in_transformer=False, adm_in_channels=None, legacy=False)


def _comfy(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    sys.argv = sys.argv[:1] + ["--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd

    return openaimodel, comfy.model_detection, comfy.ops, comfy.sd1_clip, comfy.taesd.taesd


def _random(module, generator, prefix: str):
    import torch

    out = {}
    for name, t in module.state_dict().items():
        if t.ndim == 0:  # scalars (e.g. TAESD's latent scale and shift) keep the module's own value
            out[prefix + name] = t.clone()
        elif t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            fan_in = t[0].numel() if t.ndim > 1 else 1
            std = 0.0 if name.endswith("bias") else (1.0 / fan_in ** 0.5 if t.ndim > 1 else 0.0)
            value = torch.randn(t.shape, generator=generator) * std if std else (
                torch.ones(t.shape) if name.endswith("weight") else torch.zeros(t.shape))
            out[prefix + name] = value.to(torch.float16).contiguous()
        else:
            out[prefix + name] = t.contiguous()
    return out


def build(comfy_dir: str, seed: int = 0):
    import torch

    openaimodel, detection, ops, sd1_clip, taesd = _comfy(comfy_dir)
    gen = torch.Generator().manual_seed(seed)
    unet = openaimodel.UNetModel(**UNET, operations=ops.disable_weight_init)
    sd = _random(unet, gen, "model.diffusion_model.")
    clip = sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    sd.update(_random(clip, gen, "cond_stage_model."))
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    vae = taesd.TAESD(latent_channels=4)
    sd.update(_random(vae, gen, "first_stage_model."))
    config = detection.model_config_from_unet(sd, "model.diffusion_model.")
    if config is None or type(config).__name__ != "SD15":
        raise SystemExit(f"ComfyUI did not detect the UNet as SD15 (got {type(config).__name__ if config else None}).")
    return sd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output .safetensors path (e.g. ComfyUI/models/checkpoints/tiny_sd15.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"))
    args = p.parse_args()
    if not args.comfyui_dir or not Path(args.comfyui_dir, "comfy").is_dir():
        raise SystemExit("set COMFYUI_DIR (or --comfyui-dir) to a ComfyUI checkout.")
    from safetensors.torch import save_file

    t0 = time.time()
    sd = build(args.comfyui_dir, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, args.out, metadata={"smplora.note": "random tiny SD1.x-style checkpoint for tests"})
    n = {part: sum(v.numel() for k, v in sd.items() if k.startswith(part))
         for part in ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")}
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB, "
          f"params unet {n['model.diffusion_model.']/1e6:.2f}M, "
          f"clip {n['cond_stage_model.']/1e6:.2f}M, vae {n['first_stage_model.']/1e6:.2f}M, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
