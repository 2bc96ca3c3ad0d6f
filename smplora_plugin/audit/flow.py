"""An :class:`~smplora_plugin.audit.target.AuditTarget` over flow-matching models (SD3, FLUX).

Rectified-flow models are trained on ``x_s = (1 - s) x0 + s e`` (``s`` the noise level, sigma)
to predict the velocity ``v = e - x0``. The audit's attacks speak the DDPM language
``z_t = sqrt(a_t) x0 + sqrt(1 - a_t) e`` with a noise prediction; the two are the same process up to
a per-level scale, which :class:`FlowMatchTarget` applies exactly:

* ``a_t = (1 - s_t)^2 / ((1 - s_t)^2 + s_t^2)`` and ``x_s = r_t z_t`` with ``r_t = sqrt((1 - s_t)^2 + s_t^2)``;
* the noise prediction is ``e_hat = x_s + (1 - s) v_hat(x_s, s)`` (exact: ``x_s + (1 - s)(e - x0) = e``),
  so ``e_hat - e = (1 - s)(v_hat - v)``: the audit's loss at level ``t`` is ``(1 - s_t)^2`` times the
  flow-matching (velocity) loss at the same draw;
* a deterministic DDIM step in these coordinates *is* an Euler step of the flow ODE
  (``x_u = x_s + (u - s) v_hat``), so SecMI's inversion, PIA's and SimA's queries and the
  generation attack's sampler are their flow-matching analogues (docs/audit.md).

The audit's timestep ``t`` (0..T-1) is the noise level ``s_t = shift(t / T)`` with
``shift(s) = k s / (1 + (k - 1) s)``: ``t = 0`` is the clean latent. ``k`` is the scheduler's
``shift`` (1 when the scheduler shifts by resolution at sampling time, as FLUX's does: diffusers'
and kohya's FLUX trainers then draw unshifted training levels by default).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import torch

from .target import AuditError, _lora_layers, lora_layers_off


def flow_sigmas(T: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """``(T,)`` noise levels ``s_t = shift(t / T)``, float64, ``s_0 = 0``."""
    if shift <= 0:
        raise AuditError(f"shift must be > 0, got {shift}.")
    s = torch.arange(T, dtype=torch.float64) / T
    return shift * s / (1 + (shift - 1) * s)


def flow_alphas_cumprod(sigmas: torch.Tensor) -> torch.Tensor:
    """The DDPM ``alphas_cumprod`` with the same signal-to-noise ratio as ``x = (1 - s) x0 + s e``."""
    s = sigmas.double()
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)


class FlowMatchTarget:
    """Audit target over a diffusers ``FluxPipeline`` or ``StableDiffusion3Pipeline`` carrying a LoRA.

    The base model is queried with every LoRA layer (transformer and text encoders) switched off.
    ``shift``: the noise-level shift (default: the scheduler's, or 1 with dynamic shifting);
    ``guidance``: the distilled-guidance input of FLUX.1-dev-style transformers (3.5, the default
    of diffusers' and kohya's FLUX LoRA trainers; ignored without ``guidance_embeds``);
    ``max_sequence_length``: T5 tokens (default: diffusers' trainers, FLUX 512 and SD3 77, capped
    at the tokenizer's length).
    """

    prediction_type = "flow"

    def __init__(self, pipeline: Any, *, shift: Optional[float] = None, guidance: float = 3.5,
                 max_sequence_length: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32):
        kind = type(pipeline).__name__
        if kind.startswith("Flux"):
            self.kind = "flux"
        elif kind.startswith("StableDiffusion3"):
            self.kind = "sd3"
        else:
            raise AuditError(f"FlowMatchTarget needs a FluxPipeline or StableDiffusion3Pipeline, got {kind}.")
        self.pipe = pipeline
        self.architecture = self.kind  # for the report
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.device = torch.device(device) if device is not None else next(self.transformer.parameters()).device
        self.dtype = dtype
        cfg = pipeline.scheduler.config
        if shift is None:
            shift = 1.0 if getattr(cfg, "use_dynamic_shifting", False) else float(getattr(cfg, "shift", 1.0))
        self.shift = float(shift)
        self.num_train_timesteps = int(getattr(cfg, "num_train_timesteps", 1000))
        self.sigmas = flow_sigmas(self.num_train_timesteps, self.shift)
        self.alphas_cumprod = flow_alphas_cumprod(self.sigmas).float()
        self.guidance = float(guidance)
        tok = pipeline.tokenizer_2 if self.kind == "flux" else pipeline.tokenizer_3
        default = 512 if self.kind == "flux" else 77
        self.max_sequence_length = int(max_sequence_length or min(default, int(tok.model_max_length)))
        for m in self._modules():
            m.eval()

    # -- protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float().cpu()

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        if captions is None:
            raise AuditError("condition(None) needs a batch size; pass a list of captions ('' for unconditional).")
        return [str(c or "") for c in captions]

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        return self._predict(z_t, t, cond, adapter)

    # -- optional capabilities ("gradients", "decode") -------------------------------------
    def adapter_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The LoRA parameters of the transformer and the text encoders, by qualified name."""
        return {f"{prefix}.{n}": p for prefix, mod in self._named_modules() for n, p in mod.named_parameters()
                if ".lora_" in n}

    def eps_grad(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The adapted model's noise prediction, differentiable w.r.t. :meth:`adapter_parameters`."""
        with torch.enable_grad():
            return self._predict(z_t, t, cond, True)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample.float().cpu().clamp(-1, 1)

    # -- the velocity field ------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        """The model's velocity ``v_hat(x_s, s)`` on flow-matching inputs ``x`` at noise levels ``sigma`` (B,)."""
        with self._adapter(adapter):
            captions = self.condition(cond) if cond is not None else [""] * x.shape[0]
            x = x.to(self.device, self.dtype)
            s = sigma.to(self.device, self.dtype).reshape(-1).expand(x.shape[0])
            if self.kind == "flux":
                embeds, pooled, text_ids = self.pipe.encode_prompt(
                    captions, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
                B, C, H, W = x.shape
                if H % 2 or W % 2:
                    raise AuditError(f"FLUX packs latents in 2x2 patches; latents of {H}x{W} are not even: use an "
                                     "image side divisible by 16.")
                packed = self.pipe._pack_latents(x, B, C, H, W)
                img_ids = self.pipe._prepare_latent_image_ids(B, H // 2, W // 2, self.device, self.dtype)
                guidance = None
                if getattr(self.transformer.config, "guidance_embeds", False):
                    guidance = torch.full((B,), self.guidance, device=self.device, dtype=self.dtype)
                out = self.transformer(hidden_states=packed, timestep=s, guidance=guidance,
                                       pooled_projections=pooled.to(self.dtype),
                                       encoder_hidden_states=embeds.to(self.dtype), txt_ids=text_ids, img_ids=img_ids,
                                       return_dict=False)[0]
                out = out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
            else:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    captions, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length)
                out = self.transformer(hidden_states=x, timestep=s * 1000.0,
                                       encoder_hidden_states=embeds.to(self.dtype),
                                       pooled_projections=pooled.to(self.dtype), return_dict=False)[0]
        return out

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, adapter: bool) -> torch.Tensor:
        tt = torch.as_tensor(t).long().reshape(-1).expand(z_t.shape[0]).cpu()
        s = self.sigmas[tt].view(-1, *([1] * (z_t.ndim - 1)))  # float64
        r = torch.sqrt((1 - s) ** 2 + s ** 2)
        x = (r * z_t.double()).float()
        v = self.velocity(x, self.sigmas[tt].float(), cond, adapter=adapter)
        e = x.to(v.device, v.dtype) + (1 - s).to(v.device, v.dtype) * v
        return e.float().cpu()

    # -- helpers ---------------------------------------------------------------------------
    def _named_modules(self):
        names = ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]
        return [(n, getattr(self.pipe, n)) for n in names if getattr(self.pipe, n, None) is not None]

    def _modules(self):
        return [m for _, m in self._named_modules()] + [self.vae]

    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        if enabled:
            yield
            return
        layers = [m for _, mod in self._named_modules() for m in _lora_layers(mod)]
        if not layers:
            raise AuditError("no LoRA adapter found on the transformer or text encoders, so the base model cannot be "
                             "queried: load a LoRA (load_lora_target).")
        with lora_layers_off(layers):
            yield


def flow_matching_loss(target: FlowMatchTarget, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       cond: Any, *, adapter: bool = True) -> torch.Tensor:
    """Per-sample flow-matching loss ``mean (v_hat(x_s, s) - (e - x0))^2`` at ``x_s = (1 - s) x0 + s e``."""
    s = sigma.double().view(-1, *([1] * (x0.ndim - 1)))
    x = ((1 - s) * x0.double() + s * noise.double()).float()
    with torch.no_grad():
        v = target.velocity(x, sigma.float(), cond, adapter=adapter).float().cpu()
    return (v - (noise - x0).float()).pow(2).flatten(1).mean(1)





def load_flow_target(base_model: Any, lora: Any, *, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32, adapter_name: str = "audited") -> FlowMatchTarget:
    """A diffusers FLUX or SD3 folder (``model_index.json`` + ``transformer/``, ...) with a LoRA file
    (diffusers/peft, or kohya / other formats diffusers' FLUX and SD3 loaders convert)."""
    import json
    from pathlib import Path

    import diffusers

    base_model = Path(base_model)
    index = base_model / "model_index.json"
    if not index.is_file():
        raise AuditError(f"{base_model} has transformer/ but no model_index.json: save the whole pipeline "
                         "(FluxPipeline / StableDiffusion3Pipeline .save_pretrained(DIR)).")
    name = json.loads(index.read_text()).get("_class_name", "")
    if not (name.startswith("Flux") or name.startswith("StableDiffusion3")):
        raise AuditError(f"{base_model} holds a {name or 'unnamed'} pipeline; the audit reads UNet pipelines "
                         "(SD1.x, SD2.x, SDXL) and the flow-matching FluxPipeline and StableDiffusion3Pipeline.")
    cls = diffusers.FluxPipeline if name.startswith("Flux") else diffusers.StableDiffusion3Pipeline
    try:
        kw = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        pipe = cls.from_pretrained(str(base_model), local_files_only=True, **kw)
    except Exception as exc:
        raise AuditError(f"{base_model} could not be loaded as a {cls.__name__}: {exc}") from exc
    pipe.to(device)
    try:
        pipe.load_lora_weights(str(lora), adapter_name=adapter_name)
    except Exception as exc:
        raise AuditError(f"the LoRA in {lora} could not be loaded into the {cls.__name__} in {base_model} "
                         f"(diffusers/peft or kohya format, made for this model): {exc}") from exc
    mods = [getattr(pipe, n, None) for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")]
    if not any(_lora_layers(m) for m in mods if m is not None):
        hint = ""
        if cls is diffusers.StableDiffusion3Pipeline and _has_kohya_keys(lora):
            hint = (" It is in kohya's (sd-scripts') SD3 format, which diffusers has no converter for: audit a LoRA "
                    "saved in diffusers/peft format (e.g. by diffusers' train_dreambooth_lora_sd3.py).")
        raise AuditError(f"{lora} contains no LoRA weights that diffusers' {cls.__name__} loader recognises.{hint}")
    return FlowMatchTarget(pipe, device=device, dtype=dtype)

def _has_kohya_keys(path: Any) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("lora_unet_") for k in f.keys())


__all__ = ["FlowMatchTarget", "flow_alphas_cumprod", "flow_matching_loss", "flow_sigmas", "load_flow_target"]
