"""The tiny latent diffusion model of the demo: autoencoder, caption encoder, UNet, scheduler, LoRA.

- Autoencoder: exact and free. An 8x8 grey digit is pixel-unshuffled into a ``(4, 4, 4)`` latent
  (and shuffled back); no weights, no reconstruction error.
- Caption encoder: a word embedding plus a position embedding over a fixed small vocabulary;
  ``"a handwritten digit 3"`` gives a ``(L, dim)`` sequence for the UNet's cross-attention, the
  empty caption the unconditional (null) sequence.
- UNet: a diffusers ``UNet2DConditionModel`` built from a small config in code.
- LoRA: a peft ``LoraConfig`` injected with diffusers' ``add_adapter``; the base model is the same
  UNet with the adapter disabled.

diffusers and peft are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError, StateError

DIGIT_CAPTION = "a handwritten digit {}"
VOCAB: Tuple[str, ...] = ("<pad>", "<unk>", "a", "handwritten", "digit",
                          "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
LORA_TARGETS: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def caption_for(label: int) -> str:
    """The caption of digit ``label``: ``"a handwritten digit 3"``."""
    return DIGIT_CAPTION.format(int(label))


@dataclass(frozen=True)
class TinyLDMConfig:
    """Shape of the tiny model. ``fingerprint()`` names it, so shipped weights are only loaded when they fit."""

    image_size: int = 8
    latent_channels: int = 4
    #: 1: grey images (digits, textures); 3: RGB (emoji), with ``latent_channels`` = 4 x this
    image_channels: int = 1
    block_out_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    text_dim: int = 32
    max_words: int = 6
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    vocab: Tuple[str, ...] = VOCAB

    @property
    def latent_size(self) -> int:
        return self.image_size // 2

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["image_channels"] == 1:  # grey models keep the fingerprint they were shipped with
            del d["image_channels"]
        d["block_out_channels"] = list(self.block_out_channels)
        d["vocab"] = list(self.vocab)
        return d

    def fingerprint(self) -> str:
        model = self.to_dict()
        vocab = model.pop("vocab")
        blob = json.dumps({"model": model, "vocab": vocab}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class PixelUnshuffleAE:
    """Exact "autoencoder": ``(N, C, 2s, 2s)`` images <-> ``(N, 4C, s, s)`` latents by pixel (un)shuffle."""

    factor = 2

    def __init__(self, channels: int = 1):
        self.channels = int(channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            kind = "grey images" if self.channels == 1 else f"{self.channels}-channel images"
            raise InputError(f"images must be (N, {self.channels}, H, W) {kind} in [-1, 1], "
                             f"got shape {tuple(images.shape)}.")
        return F.pixel_unshuffle(images.float(), self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.float(), self.factor)


class CaptionEncoder(nn.Module):
    """Word + position embeddings over a small vocabulary (:data:`VOCAB` for digits); unknown words map to ``<unk>``."""

    def __init__(self, dim: int = 32, max_words: int = 6, vocab: Sequence[str] = VOCAB):
        super().__init__()
        self.max_words = max_words
        self.index = {w: i for i, w in enumerate(vocab)}
        self.words = nn.Embedding(len(vocab), dim)
        self.positions = nn.Parameter(torch.zeros(max_words, dim))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros((len(captions), self.max_words), dtype=torch.long)
        for i, cap in enumerate(captions):
            toks = [self.index.get(w, 1) for w in str(cap).lower().split()][: self.max_words]
            if toks:
                ids[i, : len(toks)] = torch.tensor(toks)
        return ids

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.positions.device)
        return self.norm(self.words(ids) + self.positions)


def build_unet(cfg: TinyLDMConfig) -> nn.Module:
    """A small diffusers ``UNet2DConditionModel`` (randomly initialised from the global RNG)."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_scheduler(cfg: TinyLDMConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


class TinyLDM(nn.Module):
    """Caption encoder + UNet + scheduler + exact autoencoder; the LoRA (if any) lives on ``unet``."""

    def __init__(self, cfg: TinyLDMConfig = TinyLDMConfig(), seed: int = 0):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.text = CaptionEncoder(cfg.text_dim, cfg.max_words, cfg.vocab)
            self.unet = build_unet(cfg)
        if cfg.latent_channels != cfg.image_channels * PixelUnshuffleAE.factor ** 2:
            raise ConfigError(f"latent_channels must be 4 x image_channels ({4 * cfg.image_channels}), "
                             f"got {cfg.latent_channels}.")
        self.ae = PixelUnshuffleAE(cfg.image_channels)
        self.scheduler = build_scheduler(cfg)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.detach().float().clone(), persistent=False)

    # -- diffusion --------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(latents)

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(z0.device)[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, captions: Union[Sequence[str], torch.Tensor]) -> torch.Tensor:
        """Noise prediction; ``captions`` are strings or already-encoded ``(B, L, dim)`` states."""
        cond = captions if isinstance(captions, torch.Tensor) else self.text(list(captions))
        t = torch.as_tensor(t, device=z_t.device).long().reshape(-1).expand(z_t.shape[0])
        return self.unet(z_t, t, encoder_hidden_states=cond).sample

    # -- LoRA ---------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: Optional[float] = None, targets: Sequence[str] = LORA_TARGETS,
                 seed: int = 0) -> List[nn.Parameter]:
        """Inject a peft LoRA (adapter ``"default"``) into the UNet; freeze everything else; return its parameters."""
        from peft import LoraConfig

        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}.")
        self.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), init_lora_weights="gaussian",
                         target_modules=list(targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet.add_adapter(cfg)
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.unet.named_parameters())

    @contextlib.contextmanager
    def adapter(self, enabled: bool) -> Iterator["TinyLDM"]:
        """``with model.adapter(False):`` queries the public base model (peft adapters disabled)."""
        if enabled or not self.has_lora():
            yield self
            return
        self.unet.disable_adapters()
        try:
            yield self
        finally:
            self.unet.enable_adapters()

    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}

    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise StateError(f"LoRA state has keys the model lacks: {unexpected[:3]}...")

    # -- base weights ---------------------------------------------------------------------------
    def base_state_dict(self) -> Dict[str, torch.Tensor]:
        """Weights of the caption encoder and the UNet, without any LoRA tensors."""
        sd = {}
        for prefix, mod in (("text.", self.text), ("unet.", self.unet)):
            for k, v in mod.state_dict().items():
                if "lora_" in k:
                    continue
                sd[prefix + k.replace(".base_layer", "")] = v.detach().cpu().contiguous()
        return sd

    def load_base_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        if self.has_lora():
            raise StateError("load the base weights before adding a LoRA.")
        self.text.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
        self.unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})


def save_base(model: TinyLDM, path: Union[str, Path], extra: Optional[Dict[str, str]] = None) -> None:
    """Write the base weights as safetensors, with the config and its fingerprint in the header."""
    from safetensors.torch import save_file

    meta = {"smplora.demo.kind": "tiny-ldm-base", "smplora.demo.config": json.dumps(model.cfg.to_dict()),
            "smplora.demo.fingerprint": model.cfg.fingerprint(), **(extra or {})}
    save_file(model.base_state_dict(), str(path), metadata=meta)


def load_base(path: Union[str, Path], cfg: TinyLDMConfig = TinyLDMConfig()) -> Optional[TinyLDM]:
    """The base model stored at ``path`` if it exists and was made for ``cfg``; ``None`` otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("smplora.demo.fingerprint") != cfg.fingerprint():
        return None
    model = TinyLDM(cfg)
    model.load_base_state_dict(load_file(str(path)))
    return model
