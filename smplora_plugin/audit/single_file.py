"""Single-file base models in the original (CompVis LDM / Stability SGM) layout, loaded offline.

kohya and ComfyUI users hold one ``.safetensors`` file per base model: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder(s) under
``cond_stage_model.transformer.`` (SD1.x, CLIP ViT-L/14) or ``conditioner.embedders.0.transformer.``
and ``conditioner.embedders.1.model.`` (SDXL, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).

No config is fetched: widths, depths and block layout are read from the tensor shapes, and what
shapes do not tell (attention heads, noise schedule, latent scale, activation) comes from
:data:`ARCHITECTURES`, written here from the published architectures. The key renaming is
diffusers' own converter (``diffusers.loaders.single_file_utils``). The tokenizer (not part of a
checkpoint) comes from a folder the user gives or from the local Hugging Face cache, never the
network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .target import AuditError

PathLike = Union[str, "os.PathLike[str]"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

#: What the tensor shapes of an original-layout checkpoint do not say, per architecture.
ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "sd1": {
        "unet_heads": 8,  # num_heads = 8 at every level (SD1.x)
        "linear_projection": False,  # 1x1-conv proj_in / proj_out
        "scaling_factor": 0.18215,
        "resolution": 512,
        "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                      "steps_offset": 1},
        "text_head_dim": 64, "text_act": ["quick_gelu"],
        "tokenizers": ["openai/clip-vit-large-patch14"],
    },
    "sdxl": {
        "unet_head_dim": 64,  # num_head_channels = 64 (heads = width / 64 per level)
        "linear_projection": True,
        "scaling_factor": 0.13025,
        "resolution": 1024,
        "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                      "steps_offset": 1},
        "text_head_dim": 64, "text_act": ["quick_gelu", "gelu"],  # CLIP ViT-L/14, OpenCLIP ViT-bigG/14
        "tokenizers": ["openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"],
    },
}

NAMES = {"sd1": "SD1.x", "sdxl": "SDXL"}


def read_checkpoint(path: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` checkpoint (pickled ``.ckpt`` files are refused)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"base model file {path} does not exist.")
    if path.suffix != ".safetensors":
        raise AuditError(f"{path} is not a .safetensors file: only safetensors single-file checkpoints are read "
                         "(never pickled .ckpt files); convert it with a trusted tool first.")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise AuditError(f"{path} could not be read as a safetensors checkpoint: {exc}") from exc


def detect_layout(state: Dict[str, Any], name: str = "the checkpoint") -> str:
    """``"sd1"`` or ``"sdxl"`` from the key prefixes; :class:`AuditError` naming the fix otherwise."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)  # noqa: E731
    if has(UNET_PREFIX) and has(VAE_PREFIX):
        if has(SD1_TEXT_PREFIX):
            return "sd1"
        if has(SDXL_TEXT_PREFIX) and has(SDXL_TEXT2_PREFIX):
            return "sdxl"
        if has("cond_stage_model.model."):
            raise AuditError(f"{name} is an SD2.x checkpoint (OpenCLIP text encoder); single-file SD2.x is not "
                             "supported: convert it to a diffusers folder (diffusers' StableDiffusionPipeline."
                             "from_single_file(...).save_pretrained(DIR)) and pass that folder.")
    if has("double_blocks.") or has("model.diffusion_model.double_blocks.") or has("joint_blocks.") \
            or has("model.diffusion_model.joint_blocks."):
        raise AuditError(f"{name} is a FLUX / SD3 single-file transformer; give a diffusers folder for these "
                         "(FluxPipeline / StableDiffusion3Pipeline .save_pretrained(DIR)) instead.")
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "transformer.")) and "lora" in k for k in state):
        raise AuditError(f"{name} holds LoRA weights, not a base model: pass it as --lora and the base model as "
                         "--base-model.")
    sample = ", ".join(sorted({k.split(".")[0] for k in state})[:6]) or "no tensors"
    raise AuditError(
        f"{name} is not a known single-file layout (top-level keys: {sample}). Supported: SD1.x and SDXL "
        f"checkpoints in the original layout ({UNET_PREFIX}*, {VAE_PREFIX}* and {SD1_TEXT_PREFIX}* or "
        f"{SDXL_TEXT_PREFIX}* + {SDXL_TEXT2_PREFIX}*). For other models pass a diffusers folder "
        "(pipeline.save_pretrained(DIR)).")


def _sub(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _count(keys: Any, pattern: str) -> int:
    """How many distinct integers fill ``{}`` in ``pattern`` among ``keys``."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + r"\.")
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def unet_config(state: Dict[str, torch.Tensor], layout: str) -> Dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config of the UNet in ``state`` (original layout, full keys)."""
    u = _sub(state, UNET_PREFIX)
    facts = ARCHITECTURES[layout]
    try:
        model_channels, in_channels = u["input_blocks.0.0.weight"].shape[:2]
        out_channels = u["out.2.weight"].shape[0]
        n_in = _count(u, "input_blocks.{}")
        widths: List[int] = []
        attention: List[bool] = []
        depth: List[int] = []
        layers = None
        run = 0
        for i in range(1, n_in):
            if f"input_blocks.{i}.0.op.weight" in u:  # a downsampler closes the level
                layers = run if layers is None else layers
                if run != layers:
                    raise AuditError("levels with different numbers of res blocks")
                run = 0
                continue
            if run == 0:
                widths.append(int(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]))
                has_attn = f"input_blocks.{i}.1.proj_in.weight" in u
                attention.append(has_attn)
                depth.append(_count(u, f"input_blocks.{i}.1.transformer_blocks.{{}}") if has_attn else 1)
            run += 1
        layers = run if layers is None else layers
        attn_keys = [k for k in u if k.endswith("attn2.to_k.weight")]
        context_dim = int(u[attn_keys[0]].shape[1]) if attn_keys else None
    except KeyError as exc:
        raise AuditError(f"the UNet of this {NAMES[layout]} checkpoint lacks {UNET_PREFIX}{exc.args[0]}: the file "
                         "is incomplete or not in the original layout.") from exc
    if facts.get("unet_heads"):
        heads: Any = facts["unet_heads"]
    else:
        heads = [max(1, w // facts["unet_head_dim"]) for w in widths]
    cfg: Dict[str, Any] = {
        "sample_size": facts["resolution"] // 8,
        "in_channels": int(in_channels), "out_channels": int(out_channels),
        "block_out_channels": widths, "layers_per_block": int(layers),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context_dim, "attention_head_dim": heads,
        "use_linear_projection": bool(facts["linear_projection"]),
        "transformer_layers_per_block": [d if a else 1 for d, a in zip(depth, attention)],
    }
    if layout == "sd1" and u.get("input_blocks.1.1.proj_in.weight") is not None \
            and u["input_blocks.1.1.proj_in.weight"].ndim == 2:
        cfg["use_linear_projection"] = True  # a derivative with linear projections
    if "label_emb.0.0.weight" in u:  # SDXL's pooled-text + size/crop conditioning
        adm_in = int(u["label_emb.0.0.weight"].shape[1])
        pooled = int(state[SDXL_TEXT2_PREFIX + "text_projection"].shape[1]) if layout == "sdxl" else None
        if pooled is None or (adm_in - pooled) % 6:
            raise AuditError(f"the UNet's label_emb takes {adm_in} inputs, which does not split into the pooled text "
                             "embedding and 6 size/crop embeddings: not an SDXL UNet.")
        cfg.update({"addition_embed_type": "text_time", "addition_time_embed_dim": (adm_in - pooled) // 6,
                    "projection_class_embeddings_input_dim": adm_in})
    elif layout == "sdxl":
        raise AuditError("this SDXL checkpoint's UNet has no label_emb (size/crop conditioning); it is not an SDXL "
                         "base model (a refiner or an inpainting variant?).")
    return cfg


def vae_config(state: Dict[str, torch.Tensor], layout: str) -> Dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of the VAE in ``state``."""
    v = _sub(state, VAE_PREFIX)
    try:
        levels = _count(v, "encoder.down.{}")
        layers = _count(v, "encoder.down.0.block.{}")
        widths = [int(v[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"].shape[0]) for i in range(levels)]
        latent = int(v["encoder.conv_out.weight"].shape[0]) // 2
        cfg = {"in_channels": int(v["encoder.conv_in.weight"].shape[1]),
               "out_channels": int(v["decoder.conv_out.weight"].shape[0]),
               "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
               "block_out_channels": widths, "layers_per_block": layers, "latent_channels": latent,
               "sample_size": ARCHITECTURES[layout]["resolution"],
               "scaling_factor": ARCHITECTURES[layout]["scaling_factor"]}
    except KeyError as exc:
        raise AuditError(f"the VAE of this {NAMES[layout]} checkpoint lacks {VAE_PREFIX}{exc.args[0]}: the file is "
                         "incomplete or not in the original layout.") from exc
    return cfg


def _clip_config(hidden: int, layers: int, intermediate: int, vocab: int, positions: int, act: str,
                 head_dim: int, tokenizer: Any, projection: Optional[int] = None):
    """The CLIP text config; the special-token ids (the pooled output is read at the end token) are the tokenizer's."""
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=max(1, hidden // head_dim), max_position_embeddings=positions, hidden_act=act,
              projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**kw)


def _strip_text_model(model: Any, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Match ``text_model.``-prefixed keys to the installed transformers' CLIP layout (flattened or not)."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    if wants_prefix:
        return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): t
                for k, t in sd.items()}
    return {k[len("text_model."):] if k.startswith("text_model.") else k: t for k, t in sd.items()}


def _load_strict(model: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("position_ids")]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {bad[:3]}")
        raise AuditError(f"the {what} of this checkpoint does not fit the architecture read from it ({detail}); "
                         "the file is not a standard original-layout checkpoint: convert it to a diffusers folder "
                         "with a tool that knows its architecture and pass that folder.")
    model.load_state_dict({k: v for k, v in sd.items()}, strict=False)


def _text_encoder_1(state: Dict[str, torch.Tensor], prefix: str, act: str, head_dim: int, tokenizer: Any,
                    dtype: torch.dtype):
    from transformers import CLIPTextModel

    sd = _sub(state, prefix)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    try:
        tok = sd["text_model.embeddings.token_embedding.weight"]
        pos = sd["text_model.embeddings.position_embedding.weight"]
        layers = _count(sd, "text_model.encoder.layers.{}")
        inter = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise AuditError(f"the text encoder under {prefix} lacks {exc.args[0]}: not a CLIP text model.") from exc
    model = CLIPTextModel(_clip_config(tok.shape[1], layers, inter, tok.shape[0], pos.shape[0], act, head_dim,
                                       tokenizer))
    _load_strict(model, _strip_text_model(model, sd), "text encoder")
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def _text_encoder_2(state: Dict[str, torch.Tensor], act: str, head_dim: int, tokenizer: Any, dtype: torch.dtype):
    """SDXL's OpenCLIP ViT-bigG/14 text tower as a ``CLIPTextModelWithProjection``."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    p = SDXL_TEXT2_PREFIX
    try:
        tok = state[p + "token_embedding.weight"]
        pos = state[p + "positional_embedding"]
        proj = state[p + "text_projection"]
        layers = _count(_sub(state, p), "transformer.resblocks.{}")
        inter = state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise AuditError(f"the second text encoder ({p}) lacks {exc.args[0]}: not an OpenCLIP text tower.") from exc
    if proj.shape[0] != tok.shape[1]:
        raise AuditError(f"the second text encoder's text_projection has shape {tuple(proj.shape)}, expected "
                         f"({tok.shape[1]}, N): not an SDXL OpenCLIP text tower.")
    model = CLIPTextModelWithProjection(_clip_config(tok.shape[1], layers, inter, tok.shape[0], pos.shape[0], act,
                                                     head_dim, tokenizer, projection=int(proj.shape[1])))
    sd = convert_open_clip_checkpoint(model, state, prefix=p)
    _load_strict(model, _strip_text_model(model, sd), "second text encoder")
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def _tokenizers(layout: str, tokenizer: Optional[PathLike], n: int) -> List[Any]:
    """The ``n`` CLIP tokenizers: from ``tokenizer`` (a tokenizer folder, or a diffusers folder with
    ``tokenizer/`` [and ``tokenizer_2/``]) or the local Hugging Face cache; never downloaded."""
    from transformers import CLIPTokenizer

    def from_dir(d: Path) -> Any:
        return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)

    if tokenizer is not None:
        root = Path(tokenizer)
        if not root.is_dir():
            raise AuditError(f"--tokenizer {root}: folder does not exist.")
        try:
            if (root / "tokenizer").is_dir():
                first = from_dir(root / "tokenizer")
                second = from_dir(root / "tokenizer_2") if (root / "tokenizer_2").is_dir() else None
            else:
                first, second = from_dir(root), None
        except Exception as exc:
            raise AuditError(f"--tokenizer {root}: no CLIP tokenizer there ({exc}); give a folder with vocab.json "
                             "and merges.txt, or a diffusers model folder with tokenizer/.") from exc
        if n == 1:
            return [first]
        if second is None:  # SDXL's second tokenizer is the same BPE, padding with "!" (id 0)
            second = from_dir(root / "tokenizer" if (root / "tokenizer").is_dir() else root)
            second.pad_token = "!"
        return [first, second]
    out = []
    for repo in ARCHITECTURES[layout]["tokenizers"][:n]:
        try:
            out.append(CLIPTokenizer.from_pretrained(repo, local_files_only=True))
        except Exception as exc:
            raise AuditError(
                f"a single-file {NAMES[layout]} checkpoint carries no tokenizer and {repo} is not in the local "
                "Hugging Face cache (nothing is downloaded): pass --tokenizer DIR, a folder with the CLIP "
                "tokenizer (vocab.json, merges.txt) or any diffusers model folder of this architecture "
                "(tokenizer/ [and tokenizer_2/]).") from exc
    return out


def load_single_file(path: PathLike, *, tokenizer: Optional[PathLike] = None, dtype: torch.dtype = torch.float32
                     ) -> Dict[str, Any]:
    """The components of an SD1.x or SDXL single-file checkpoint: ``layout`` (``"sd1"``/``"sdxl"``),
    ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (DDPM) and, for SDXL,
    ``text_encoder_2`` and ``tokenizer_2``. Every check runs before any weight is copied."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = read_checkpoint(path)
    layout = detect_layout(state, str(path))
    facts = ARCHITECTURES[layout]
    ucfg, vcfg = unet_config(state, layout), vae_config(state, layout)
    toks = _tokenizers(layout, tokenizer, 2 if layout == "sdxl" else 1)
    sched = dict(facts["scheduler"])
    if "v_pred" in state:  # marker key of v-prediction derivatives
        sched["prediction_type"] = "v_prediction"
    unet = diffusers.UNet2DConditionModel.from_config(ucfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, ucfg), "UNet")
    vae = diffusers.AutoencoderKL.from_config(vcfg)
    vsd = convert_ldm_vae_checkpoint(state, vcfg)
    _load_strict(vae, vsd, "VAE")
    head = facts["text_head_dim"]
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    out: Dict[str, Any] = {"layout": layout, "unet": unet.eval(), "vae": vae.eval(),
                           "scheduler": diffusers.DDPMScheduler.from_config(sched), "tokenizer": toks[0]}
    if layout == "sd1":
        out["text_encoder"] = _text_encoder_1(state, SD1_TEXT_PREFIX, facts["text_act"][0], head, toks[0], dtype)
    else:
        out["text_encoder"] = _text_encoder_1(state, SDXL_TEXT_PREFIX, facts["text_act"][0], head, toks[0], dtype)
        out["text_encoder_2"] = _text_encoder_2(state, facts["text_act"][1], head, toks[1], dtype)
        out["tokenizer_2"] = toks[1]
    for tok, enc in zip(toks, [out["text_encoder"], out.get("text_encoder_2")]):
        rows = int(enc.config.vocab_size)
        if not 2 < len(tok) <= rows:
            where = f"--tokenizer {tokenizer}" if tokenizer is not None else "the tokenizer in the local cache"
            raise AuditError(f"{where} has {len(tok)} tokens but the checkpoint's text encoder knows {rows}: it is not "
                             "this model's tokenizer. Pass --tokenizer DIR with the CLIP tokenizer of this "
                             "architecture (vocab.json, merges.txt), or a diffusers model folder with tokenizer/.")
        pos = int(enc.config.max_position_embeddings)
        if tok.model_max_length > pos:
            tok.model_max_length = pos
    return out


__all__ = ["ARCHITECTURES", "detect_layout", "load_single_file", "read_checkpoint", "unet_config", "vae_config"]
