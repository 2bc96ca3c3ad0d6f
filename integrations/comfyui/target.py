"""An :class:`~smplora_plugin.audit.AuditTarget` over ComfyUI's model wrapper.

The audit's attacks speak DDPM: ``z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` on a table of ``T``
timesteps, and a noise prediction. ComfyUI's models are called on ``x = x0 + sigma eps`` (its
``model_sampling.noise_scaling`` for epsilon- and v-parameterised models) and return the
prediction of ``x0`` whatever their parameterisation (``model_sampling.calculate_denoised``).
With ``a_t = 1 / (1 + sigma_t^2)`` the two views are the same: ``x = z_t / sqrt(a_t)`` and
``eps = (x - x0_pred) / sigma``. So every model whose ``model_sampling`` has a discrete
``sigmas`` table and that noise scaling (SD1.x, SD2.x incl. v-prediction, SDXL, ...) is audited
by every attack; flow-matching models (``x = (1 - s) x0 + s eps``: SD3, Flux, ...) are refused
with a clear error (docs/audit.md).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from smplora_plugin.audit import AuditError


def _noise_scaling_is_additive(sampling: Any) -> bool:
    """True when ``noise_scaling(s, n, x0) == x0 + s * n`` (ComfyUI's EPS / V_PREDICTION)."""
    try:
        s = torch.tensor([0.5])
        out_n = sampling.noise_scaling(s, torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), False)
        out_x = sampling.noise_scaling(s, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), False)
    except Exception:
        return False
    return math.isclose(float(out_n.flatten()[0]), 0.5, rel_tol=1e-4) and math.isclose(float(out_x.flatten()[0]), 1.0,
                                                                                     rel_tol=1e-4)


class ComfyTarget:
    """Audit target over a ComfyUI MODEL/CLIP/VAE and the same model with a LoRA applied.

    ``model``/``clip`` are the base (public) components; ``lora_model``/``lora_clip`` the ones
    returned by ``comfy.sd.load_lora_for_models`` (``lora_clip`` may be ``clip`` when the LoRA
    has no text-encoder weights). ``load_models`` is ``comfy.model_management.load_models_gpu``.
    """

    def __init__(self, model: Any, clip: Any, vae: Any, lora_model: Any, lora_clip: Any, *, load_models: Any):
        sampling = model.model.model_sampling
        sigmas = getattr(sampling, "sigmas", None)
        if (sigmas is None or not torch.is_tensor(sigmas) or sigmas.ndim != 1
                or not _noise_scaling_is_additive(sampling)):
            raise AuditError(
                f"the audit needs a model with a discrete DDPM-style noise schedule (SD1.x, SD2.x, SDXL, ...); "
                f"{type(sampling).__name__} is not one (flow-matching models such as SD3 or Flux are not supported "
                "by the audit's attacks). Audit an epsilon- or v-prediction checkpoint."
            )
        self.model, self.clip, self.vae = model, clip, vae
        self.lora_model, self.lora_clip = lora_model, lora_clip
        self._load = load_models
        self.sigmas = sigmas.detach().float().cpu()
        self.num_train_timesteps = int(self.sigmas.numel())
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas ** 2)
        self.prediction_type = "epsilon"
        self._text: Dict[Tuple[str, bool], Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    # -- protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        latent = self.vae.encode(pixels[..., :3])
        return self.model.model.process_latent_in(latent.float()).float().cpu()

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        if captions is None:
            raise AuditError("condition(None) needs a batch size; pass a list of captions ('' for unconditional).")
        return [str(c or "") for c in captions]

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        patcher = self.lora_model if adapter else self.model
        self._load([patcher])
        base = patcher.model
        device = patcher.load_device
        b = z_t.shape[0]
        tt = torch.as_tensor(t).long().reshape(-1).expand(b).cpu()
        sigma = self.sigmas[tt]
        view = (-1,) + (1,) * (z_t.ndim - 1)
        x = (z_t.float() * torch.sqrt(1.0 + sigma ** 2).view(view)).to(device)
        captions = list(cond) if cond is not None else [""] * b
        cross, pooled = self._encode_text(captions, adapter)
        kwargs = self._model_conds(base, x, cross.to(device), None if pooled is None else pooled.to(device), device)
        x0 = base.apply_model(x, sigma.to(device), **kwargs).float()
        eps = (x - x0) / sigma.to(device).view(view)
        return eps.float().cpu()

    # -- helpers ---------------------------------------------------------------------------
    def _encode_text(self, captions: List[str], adapter: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        clip = self.lora_clip if adapter else self.clip
        crosses, pooleds = [], []
        for caption in captions:
            key = (caption, adapter)
            if key not in self._text:
                tokens = clip.tokenize(caption)
                cross, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                self._text[key] = (cross.float().cpu(), None if pooled is None else pooled.float().cpu())
            cross, pooled = self._text[key]
            crosses.append(cross)
            pooleds.append(pooled)
        pooled = None if any(p is None for p in pooleds) else torch.cat(pooleds)
        return torch.cat(crosses), pooled

    @staticmethod
    def _model_conds(base: Any, x: torch.Tensor, cross: torch.Tensor, pooled: Optional[torch.Tensor],
                     device: Any) -> Dict[str, Any]:
        """The model's own conditioning inputs (``extra_conds``: cross-attention, SDXL's ``y``, ...)."""
        h, w = x.shape[-2:]
        scale = 8
        args = dict(cross_attn=cross, device=device, noise=x, width=w * scale, height=h * scale,
                    target_width=w * scale, target_height=h * scale, crop_w=0, crop_h=0)
        if pooled is not None:
            args["pooled_output"] = pooled
        out = {}
        for key, cond in base.extra_conds(**args).items():
            out[key] = cond.process_cond(batch_size=x.shape[0], device=device, area=None).cond
        return out
