"""Test helper: write a diffusers SD1.x / SDXL pipeline as one original-layout (LDM / SGM) checkpoint.

Written for the tests from the layout of the original UNet, VAE and text encoders (the inverse of what
``smplora_plugin.audit.single_file`` reads through diffusers' converter), so a round trip checks both.
"""

from typing import Dict

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table: Dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return table.get(head, head) + "." + tail


def unet_to_ldm(sd: Dict[str, torch.Tensor], layers: int) -> Dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` keys."""
    out = {}
    up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        p = k.split(".")
        mod = ".".join(p[:2]) if p[0] in ("time_embedding", "add_embedding") else p[0]
        if mod in fixed:
            new = fixed[mod] + "." + ".".join(p[len(mod.split(".")):])
        elif p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (layers + 1)}.0.op." + ".".join(p[5:])
            else:
                j = int(p[3])
                idx = 1 + i * (layers + 1) + j
                rest = ".".join(p[4:])
                new = (f"input_blocks.{idx}.0." + _resnet(rest, RESNET) if kind == "resnets"
                       else f"input_blocks.{idx}.1." + rest)
        elif p[0] == "mid_block":
            j, rest = int(p[2]), ".".join(p[3:])
            new = f"middle_block.{2 * j}." + _resnet(rest, RESNET) if p[1] == "resnets" else "middle_block.1." + rest
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                new = f"output_blocks.{i * (layers + 1) + layers}.{2 if i in up_attn else 1}." + ".".join(p[4:])
            else:
                j = int(p[3])
                rest = ".".join(p[4:])
                idx = i * (layers + 1) + j
                new = (f"output_blocks.{idx}.0." + _resnet(rest, RESNET) if kind == "resnets"
                       else f"output_blocks.{idx}.1." + rest)
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    out = {}
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    for k, v in sd.items():
        p = k.split(".")
        if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
            new = k
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out." + ".".join(p[2:])
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + _resnet(".".join(p[4:]), VAE_RESNET)
            else:
                rest = ".".join(p[4:])
                for a, b in VAE_ATTN.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                new = f"{p[0]}.mid.attn_1." + rest
                if v.ndim == 2:
                    v = v[:, :, None, None]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            level, name = (i, "down") if p[1] == "down_blocks" else (n_up - 1 - i, "up")
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}." + ".".join(p[5:])
            else:
                new = f"{p[0]}.{name}.{level}.block.{p[4]}." + _resnet(".".join(p[5:]), VAE_RESNET)
        else:
            raise KeyError(k)
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (flattened or ``text_model.``) -> ``prefix + text_model.*``."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP text-tower keys under ``prefix``."""
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        a, b = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[b + f"attn.in_proj_{w}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            out[b + f"attn.out_proj.{w}"] = sd[a + f"self_attn.out_proj.{w}"]
            out[b + f"ln_1.{w}"] = sd[a + f"layer_norm1.{w}"]
            out[b + f"ln_2.{w}"] = sd[a + f"layer_norm2.{w}"]
            out[b + f"mlp.c_fc.{w}"] = sd[a + f"mlp.fc1.{w}"]
            out[b + f"mlp.c_proj.{w}"] = sd[a + f"mlp.fc2.{w}"]
    return out


def save_original_layout(pipe, path) -> None:
    """Save ``pipe`` (StableDiffusionPipeline or StableDiffusionXLPipeline) as one original-layout file."""
    from safetensors.torch import save_file

    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block))
    state.update(vae_to_ldm(pipe.vae.state_dict()))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def kohya_sdxl(state, layers_per_block):
    """A peft UNet LoRA state dict under kohya's SDXL names (the original UNet's paths:
    ``lora_unet_input_blocks_4_1_...``)."""
    from _helpers import to_kohya

    out = {}
    for k, v in state.items():
        mod, kind = k.rsplit(".lora_", 1)
        ldm = next(iter(unet_to_ldm({mod + ".weight": v}, layers_per_block)))
        ldm = ldm[len("model.diffusion_model."):-len(".weight")]
        out.update(to_kohya({f"{ldm}.lora_{kind}": v}))
    return out
