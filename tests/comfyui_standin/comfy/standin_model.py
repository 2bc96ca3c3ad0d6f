"""A tiny epsilon-parameterised conditional denoiser with ComfyUI-style layers, patcher, CLIP and VAE."""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List

import torch
import torch.nn.functional as F


def _apply(fns: List[Any], w: torch.Tensor) -> torch.Tensor:
    for f in fns:
        w = f(w)
    return w


class Conv2d(torch.nn.Conv2d):
    """A conv whose weight and bias pass through ``weight_function`` / ``bias_function`` (as ComfyUI's ops)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function: List[Any] = []
        self.bias_function: List[Any] = []

    def forward(self, x):
        w = _apply(self.weight_function, self.weight).to(x.dtype)
        b = _apply(self.bias_function, self.bias).to(x.dtype)
        return F.conv2d(x, w, b, padding=self.padding)


class Linear(torch.nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function: List[Any] = []
        self.bias_function: List[Any] = []

    def forward(self, x):
        w = _apply(self.weight_function, self.weight).to(x.dtype)
        b = _apply(self.bias_function, self.bias).to(x.dtype)
        return F.linear(x, w, b)


class Denoiser(torch.nn.Module):
    def __init__(self, channels: int = 4, width: int = 16, context_dim: int = 8):
        super().__init__()
        self.conv_in = Conv2d(channels, width, 3, padding=1)
        self.context = Linear(context_dim, width)
        self.time = Linear(1, width)
        self.conv_out = Conv2d(width, channels, 3, padding=1)

    def forward(self, x, timesteps, context=None):
        h = self.conv_in(x) + self.time(timesteps.view(-1, 1).to(x.dtype) / 100.0)[:, :, None, None]
        if context is not None:
            h = h + self.context(context.to(x.dtype).mean(1))[:, :, None, None]
        return self.conv_out(F.silu(h))


class ModelSamplingDiscrete(torch.nn.Module):
    """Epsilon parameterisation on a discrete schedule: x = x0 + sigma * eps."""

    def __init__(self, steps: int = 100):
        super().__init__()
        betas = torch.linspace(1e-4, 0.05, steps, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        self.register_buffer("sigmas", ((1 - ac) / ac).sqrt().float())

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)).to(noise.dtype)

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)) ** 2 + 1).sqrt()

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

    def timestep(self, sigma):
        return (sigma.reshape(-1, 1).float() - self.sigmas.view(1, -1)).abs().argmin(1).float()

    def percent_to_sigma(self, percent):
        idx = int(round((1 - percent) * (len(self.sigmas) - 1)))
        return float(self.sigmas[idx])


class CondCrossAttn:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        c = self.cond
        return CondCrossAttn(c.repeat(batch_size // c.shape[0], 1, 1) if c.shape[0] != batch_size else c)


class BaseModel(torch.nn.Module):
    scale_factor = 0.5

    def __init__(self):
        super().__init__()
        self.diffusion_model = Denoiser()
        self.model_sampling = ModelSamplingDiscrete()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's own signature)
        xc = self.model_sampling.calculate_input(t, x)
        out = self.diffusion_model(xc, self.model_sampling.timestep(t), context=c_crossattn)
        return self.model_sampling.calculate_denoised(t, out.float(), x)

    def extra_conds(self, **kwargs):
        return {"c_crossattn": CondCrossAttn(kwargs["cross_attn"])}

    def process_latent_in(self, latent):
        return latent * self.scale_factor


class ModelPatcher:
    """Weight wrappers (training adapters) and merged patches (loaded LoRAs), applied on load."""

    def __init__(self, model: torch.nn.Module, load_device=torch.device("cpu")):  # noqa: B008 (ComfyUI's signature)
        self.model = model
        self.load_device = load_device
        self.offload_device = torch.device("cpu")
        self.patches: Dict[str, List[Any]] = {}
        self.weight_wrapper_patches: Dict[str, List[Any]] = {}
        self.model_options: Dict[str, Any] = {"transformer_options": {}}
        self.backup: Dict[str, torch.Tensor] = {}
        self.compute_dtype = None

    def clone(self) -> "ModelPatcher":
        n = ModelPatcher(self.model, self.load_device)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.weight_wrapper_patches = {k: list(v) for k, v in self.weight_wrapper_patches.items()}
        return n

    def model_dtype(self):
        return next(self.model.parameters()).dtype

    def set_model_compute_dtype(self, dtype):
        self.compute_dtype = dtype

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches.setdefault(name, []).append(function)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for key, patch in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, patch))
        return list(patches)

    def patch_model(self):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, plist in self.patches.items():
                w = params[key]
                self.backup[key] = w.detach().clone()
                for strength, patch in plist:
                    w += strength * patch_delta(patch, w)
        modules = dict(self.model.named_modules())
        for key, fns in self.weight_wrapper_patches.items():
            mod_name, attr = key.rsplit(".", 1)
            setattr(modules[mod_name], f"{attr}_function", list(fns))

    def unpatch_model(self):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, w in self.backup.items():
                params[key].copy_(w)
        self.backup = {}
        for m in self.model.modules():
            if hasattr(m, "weight_function"):
                m.weight_function, m.bias_function = [], []


class LoRAAdapter:
    """A loaded LoRA patch (as comfy.weight_adapter's): ``weights = (up, down, alpha, mid)``."""

    def __init__(self, weights):
        self.weights = weights


def patch_delta(patch, w: torch.Tensor) -> torch.Tensor:
    if isinstance(patch, tuple):
        return patch[1][0].to(w.dtype)
    up, down, alpha, _ = patch.weights
    scale = (alpha / down.shape[0]) if alpha is not None else 1.0
    return (scale * (up.float().flatten(1) @ down.float().flatten(1))).view(w.shape).to(w.dtype)


class ClipModel(torch.nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Parameter(torch.randn(64, dim, generator=gen))


class CLIP:
    def __init__(self):
        self.cond_stage_model = ClipModel()
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP.__new__(CLIP)
        n.cond_stage_model = self.cond_stage_model
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches({k: v for k, v in patches.items() if k.startswith("embed")}, strength_patch)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return [int(hashlib.sha256(w.encode()).hexdigest(), 16) % 64 for w in (text.split() or [""])]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        emb = self.cond_stage_model.embed[torch.tensor(tokens)][None].detach().clone()
        return (emb, emb.mean(1)) if return_pooled else emb


class VAE:
    """Pixels (B, H, W, 3) in [0, 1] -> latents (B, 4, H/8, W/8): 8x8 average pooling and a fixed channel mix."""

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        self.mix = torch.randn(4, 3, generator=gen)

    def encode(self, pixel_samples):
        x = pixel_samples.movedim(-1, 1).float() * 2 - 1
        pooled = F.avg_pool2d(x, 8)
        return torch.einsum("oc,bchw->bohw", self.mix, pooled)


def tiny_components(seed: int = 0):
    """(MODEL patcher, CLIP, VAE) of the stand-in, seeded."""
    torch.manual_seed(seed)
    return ModelPatcher(BaseModel()), CLIP(), VAE()
