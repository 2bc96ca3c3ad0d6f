"""The audit target protocol: how attacks query a (LoRA-adapted) diffusion model.

Every attack scores samples only through :class:`AuditTarget`, so the same attacks serve the tiny
demo model, a diffusers UNet (SD1.x/SD2.x, SDXL) carrying a peft/diffusers LoRA, a kohya LoRA loaded
into diffusers, and flow-matching transformers (SD3, FLUX: :mod:`.flow`), all through
:func:`load_lora_target` (diffusers folders or original-layout single files, :mod:`.single_file`).
diffusers, peft and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from .types import AuditError


@runtime_checkable
class AuditTarget(Protocol):
    """What an attack needs from a model (see docs/architecture.md)."""

    num_train_timesteps: int  # T
    alphas_cumprod: torch.Tensor  # (T,) on CPU
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (what the model predicts; eps() is always noise)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1] -> latents, deterministically (VAE posterior mean, scaled)."""

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        """Conditioning for a batch; ``None`` or ``""`` entries give the unconditional (null) condition."""

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        """Noise prediction at ``(z_t, t)``; ``adapter=False`` queries the public base model."""


# Optional capabilities: some attacks need more than AuditTarget. A target offers a capability by
# implementing all of its methods:
#   "gradients": adapter_parameters() -> {name: LoRA parameter} (names contain ".lora_"; the text
#                before it names the LoRA module), and eps_grad(z_t, t, cond) -> the adapted
#                model's noise prediction with an autograd graph back to those parameters;
#   "decode":    decode(latents) -> images (N, C, H, W) in [-1, 1] (inverse of encode).
CAPABILITIES: Dict[str, tuple] = {"gradients": ("adapter_parameters", "eps_grad"), "decode": ("decode",)}


def has_capability(target: Any, capability: str) -> bool:
    """Whether ``target`` implements every method of ``capability`` (see :data:`CAPABILITIES`)."""
    if capability not in CAPABILITIES:
        raise AuditError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}.")
    return all(callable(getattr(target, m, None)) for m in CAPABILITIES[capability])


def missing_capabilities(target: Any, capabilities: Sequence[str]) -> List[str]:
    """The capabilities in ``capabilities`` that ``target`` lacks."""
    return [c for c in capabilities if not has_capability(target, c)]


def check_target(target: Any) -> None:
    """Raise :class:`AuditError` if ``target`` does not implement :class:`AuditTarget`."""
    missing = [name for name in ("num_train_timesteps", "alphas_cumprod", "encode", "condition", "eps")
               if not hasattr(target, name)]
    if missing:
        raise AuditError(
            f"{type(target).__name__} is not an AuditTarget: it lacks {', '.join(missing)}. "
            "Implement smplora_plugin.audit.target.AuditTarget or use DiffusersTarget / load_lora_target."
        )
    ac = torch.as_tensor(target.alphas_cumprod)
    if ac.ndim != 1 or ac.numel() != int(target.num_train_timesteps):
        raise AuditError(
            f"alphas_cumprod has shape {tuple(ac.shape)} but num_train_timesteps is {target.num_train_timesteps}; "
            "they must describe the same noise schedule."
        )


# --------------------------------------------------------------------------------------------
# diffusers adapter


class DiffusersTarget:
    """:class:`AuditTarget` over diffusers components with a LoRA that can be switched off.

    ``unet`` is a ``UNet2DConditionModel`` (or ``UNet2DModel``) carrying a peft / diffusers LoRA;
    the base model is queried by disabling the adapters (``disable_adapters`` /
    ``enable_adapters``, or a peft ``PeftModel.disable_adapter()`` context), or by ``base_unet``
    when given. ``vae`` (optional ``AutoencoderKL``): latents are the scaled posterior mean.
    ``text_encoder`` + ``tokenizer`` (optional): captions are encoded per call with the adapter
    state of that call, so a text-encoder LoRA is switched off for the base model too.

    SDXL (a UNet with ``addition_embed_type="text_time"``) also needs ``text_encoder_2`` and
    ``tokenizer_2``: the cross-attention input is both encoders' penultimate hidden states side by
    side, ``text_embeds`` the second encoder's pooled projection, and ``time_ids`` are
    ``(H, W, 0, 0, H, W)`` in pixels of the audited image (original size = target size, no crop), as
    the diffusers and kohya SDXL trainers give an image already at the training resolution.
    """

    def __init__(self, unet: Any, scheduler: Any, *, vae: Any = None, text_encoder: Any = None, tokenizer: Any = None,
                 base_unet: Any = None, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32,
                 text_encoder_2: Any = None, tokenizer_2: Any = None):
        self.unet = unet
        self.base_unet = base_unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.sdxl = getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
        self.architecture = "sdxl" if self.sdxl else "unet"  # for the report
        if self.sdxl and (text_encoder is None or tokenizer is None or text_encoder_2 is None or tokenizer_2 is None):
            raise AuditError("this UNet takes SDXL's added conditions (text_embeds, time_ids): give DiffusersTarget "
                             "text_encoder, tokenizer, text_encoder_2 and tokenizer_2.")
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.dtype = dtype
        cfg = scheduler.config
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu()
        self.prediction_type = str(getattr(cfg, "prediction_type", "epsilon") or "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise AuditError(f"prediction_type {self.prediction_type!r} is not supported; use 'epsilon' or "
                             "'v_prediction'.")
        self._cross_attention_dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        if self._cross_attention_dim is not None and (text_encoder is None or tokenizer is None):
            raise AuditError("this UNet is text-conditional: give DiffusersTarget a text_encoder and a tokenizer.")
        for m in (unet, base_unet, vae, text_encoder, text_encoder_2):
            if m is not None:
                m.eval()  # queries run under torch.no_grad(); parameters are left as they are

    # -- protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.dtype)
        if self.vae is None:
            return x.float().cpu()
        dist = self.vae.encode(x).latent_dist
        z = dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        return ((z - shift) * scale).float().cpu()

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        if self.tokenizer is None:
            return None
        if captions is None:
            raise AuditError("condition(None) needs a batch size; pass a list of captions ('' for unconditional).")
        return list(captions)

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        return self._predict(z_t, t, cond, adapter)

    # -- optional capabilities ("gradients", "decode") -------------------------------------
    def adapter_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The LoRA parameters of the UNet and the text encoder(s), by qualified name."""
        return {f"{prefix}.{n}": p for prefix, mod in (("unet", self.unet), ("text_encoder", self.text_encoder),
                                                       ("text_encoder_2", self.text_encoder_2))
                if mod is not None for n, p in mod.named_parameters() if ".lora_" in n}

    def eps_grad(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The adapted model's noise prediction, differentiable w.r.t. :meth:`adapter_parameters`."""
        with torch.enable_grad():
            return self._predict(z_t, t, cond, True)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (the VAE decoder; without a VAE the latents are the pixels)."""
        if self.vae is None:
            return latents.float().cpu()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        z = latents.to(self.device, self.dtype) / scale + shift
        return self.vae.decode(z).sample.float().cpu().clamp(-1, 1)

    def _predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, adapter: bool) -> torch.Tensor:
        with self._adapter(adapter) as unet:
            z = z_t.to(self.device, self.dtype)
            tt = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(z.shape[0])
            if self.sdxl:
                hidden, pooled = self._encode_text_sdxl(cond)
                h, w = (s * self._vae_scale() for s in z.shape[-2:])
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype)
                time_ids = time_ids.expand(z.shape[0], 6)
                out = unet(z, tt, encoder_hidden_states=hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            elif self.tokenizer is not None:
                hidden = self._encode_text(cond)
                out = unet(z, tt, encoder_hidden_states=hidden).sample
            else:
                out = unet(z, tt).sample
        out = out.float().cpu()
        if self.prediction_type == "v_prediction":
            ac = self.alphas_cumprod[tt.cpu()].view(-1, *([1] * (z_t.ndim - 1)))
            out = ac.sqrt() * out + (1 - ac).sqrt() * z_t.float()
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=getattr(self.tokenizer, "model_max_length", 77), return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    def _encode_text_sdxl(self, captions: Sequence[str]):
        """SDXL: (both encoders' penultimate hidden states concatenated, the second's pooled projection)."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tok = tokenizer(list(captions), padding="max_length", truncation=True,
                            max_length=getattr(tokenizer, "model_max_length", 77), return_tensors="pt")
            out = encoder(tok.input_ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def _vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[Any]:
        """Yield the UNet to query; with ``enabled=False`` every LoRA layer is switched off meanwhile.

        Works on peft tuner layers directly (diffusers ``add_adapter``/``load_lora_weights``, peft
        ``PeftModel``, transformers text encoders alike); each layer's previous on/off state and
        every parameter's ``requires_grad`` are restored afterwards.
        """
        if enabled:
            yield self.unet
            return
        if self.base_unet is not None:
            yield self.base_unet
            return
        layers = [m for mod in (self.unet, self.text_encoder, self.text_encoder_2) if mod is not None
                  for m in _lora_layers(mod)]
        if not layers:
            raise AuditError(
                "no LoRA adapter found on the UNet or text encoder, so the base model cannot be queried: "
                "load a LoRA (load_lora_target) or pass base_unet."
            )
        with lora_layers_off(layers):
            yield self.unet


@contextlib.contextmanager
def lora_layers_off(layers: Sequence[Any]) -> Iterator[None]:
    """Switch the given peft LoRA layers off for the block; restore each layer's on/off state and its
    parameters' ``requires_grad`` (peft's ``enable_adapters`` sets them) afterwards."""
    was_off = [bool(m.disable_adapters) for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, off in zip(layers, was_off):
            if not off:
                m.enable_adapters(True)
        for p, g in grads:
            p.requires_grad_(g)


def _lora_layers(module: Any) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is part of the audit extra
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


# --------------------------------------------------------------------------------------------
# loading a LoRA file against a diffusers base model folder

PathLike = Union[str, "os.PathLike[str]"]


def load_lora_target(base_model: PathLike, lora: PathLike, *, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32, adapter_name: str = "audited",
                     tokenizer: Optional[PathLike] = None) -> Any:
    """Load a base model and a LoRA file (diffusers/peft or kohya format) as an audit target.

    ``base_model`` is a diffusers-format folder (SD1.x/SD2.x and SDXL: ``unet/`` and ``scheduler/``,
    with ``vae/``, ``text_encoder/``, ``tokenizer/`` [and ``text_encoder_2/``, ``tokenizer_2/``] when
    present; SD3 and FLUX: ``transformer/`` and the rest of the pipeline) or a single-file
    ``.safetensors`` checkpoint in the original SD1.x / SDXL layout, built offline from its tensor
    shapes (:mod:`.single_file`; its tokenizer from ``tokenizer``, a folder, or the local Hugging
    Face cache). The LoRA is converted by diffusers' LoRA loaders (kohya ``lora_unet_*`` /
    ``lora_te*_*`` keys included) and injected into the denoiser and, when the file has
    text-encoder weights, the text encoder(s). UNet models give a :class:`DiffusersTarget`,
    flow-matching models a :class:`~.flow.FlowMatchTarget`.
    """
    base_model, lora = Path(base_model), Path(lora)
    if not base_model.exists():
        raise AuditError(f"base model {base_model} does not exist: pass a diffusers-format model folder or a "
                         "single-file .safetensors checkpoint (SD1.x / SDXL original layout).")
    if not lora.is_file():
        raise AuditError(f"LoRA file {lora} does not exist.")
    if lora.suffix != ".safetensors":
        raise AuditError(f"LoRA file {lora} is not a .safetensors file; only safetensors LoRA files are read (never "
                         "pickles).")
    if base_model.is_file():
        from .single_file import load_single_file

        parts = load_single_file(base_model, tokenizer=tokenizer, dtype=dtype)
        parts.pop("layout")
        parts = {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
        return _unet_target(parts, lora, str(base_model), device, dtype, adapter_name)
    if (base_model / "transformer").is_dir():
        from .flow import load_flow_target

        return load_flow_target(base_model, lora, device=device, dtype=dtype, adapter_name=adapter_name)
    for sub in ("unet", "scheduler"):
        if not (base_model / sub).is_dir():
            raise AuditError(
                f"{base_model} has no {sub}/ subfolder: a diffusers-format model folder is needed "
                "(e.g. one written by pipeline.save_pretrained), or a single-file .safetensors checkpoint."
            )

    import diffusers

    unet_cfg = _read_json(base_model / "unet" / "config.json")
    unet_cls = getattr(diffusers, unet_cfg.get("_class_name", "UNet2DConditionModel"))
    parts: Dict[str, Any] = {"unet": unet_cls.from_pretrained(base_model, subfolder="unet",
                                                              torch_dtype=dtype).to(device)}
    sched_cfg = _read_json(base_model / "scheduler" / "scheduler_config.json")
    parts["scheduler"] = diffusers.DDPMScheduler.from_config(sched_cfg)
    if (base_model / "vae").is_dir():
        parts["vae"] = diffusers.AutoencoderKL.from_pretrained(base_model, subfolder="vae",
                                                               torch_dtype=dtype).to(device)
    for suffix in ("", "_2"):
        if (base_model / f"text_encoder{suffix}").is_dir() and (base_model / f"tokenizer{suffix}").is_dir():
            import transformers

            te_cfg = _read_json(base_model / f"text_encoder{suffix}" / "config.json")
            te_cls = getattr(transformers, (te_cfg.get("architectures") or ["CLIPTextModel"])[0])
            parts[f"text_encoder{suffix}"] = te_cls.from_pretrained(base_model / f"text_encoder{suffix}",
                                                                    torch_dtype=dtype).to(device)
            parts[f"tokenizer{suffix}"] = transformers.AutoTokenizer.from_pretrained(base_model / f"tokenizer{suffix}")
    return _unet_target(parts, lora, str(base_model), device, dtype, adapter_name)


def _unet_target(parts: Dict[str, Any], lora: Path, base_name: str, device: Any, dtype: torch.dtype,
                 adapter_name: str) -> DiffusersTarget:
    """Inject the LoRA in ``lora`` into the UNet (and text encoders) of ``parts``; the target over them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = getattr(parts["unet"].config, "addition_embed_type", None) == "text_time"
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    try:
        kw = {"unet_config": parts["unet"].config} if sdxl else {}
        state, alphas = loader.lora_state_dict(str(lora), **kw)
    except Exception as exc:
        raise AuditError(f"{lora} could not be read as a LoRA file (diffusers/peft or kohya format): {exc}") from exc
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    unet_keys = [k for k in state if k.startswith("unet.")]
    te_keys = {e: [k for k in state if k.startswith(e + ".")] for e in encoders}
    if not unet_keys and not any(te_keys.values()):
        raise AuditError(f"{lora} contains no UNet or text-encoder LoRA weights that diffusers recognises.")
    try:
        if unet_keys:
            loader.load_lora_into_unet(state, alphas, unet=parts["unet"], adapter_name=adapter_name)
        for enc, keys in te_keys.items():
            if not keys:
                continue
            if parts.get(enc) is None:
                raise AuditError(f"{lora} has {enc} LoRA weights but {base_name} has no {enc}.")
            loader.load_lora_into_text_encoder(state, alphas, text_encoder=parts[enc], prefix=enc,
                                               adapter_name=adapter_name)
    except AuditError:
        raise
    except Exception as exc:
        raise AuditError(f"the LoRA in {lora} does not fit the base model in {base_name}: {exc}") from exc
    return DiffusersTarget(parts["unet"], parts["scheduler"], vae=parts.get("vae"),
                           text_encoder=parts.get("text_encoder"), tokenizer=parts.get("tokenizer"),
                           text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"),
                           device=device, dtype=dtype)


def _read_json(path: Path) -> dict:
    import json

    if not path.is_file():
        raise AuditError(f"{path} is missing: the model folder is incomplete.")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise AuditError(f"{path} is not valid JSON ({exc}).") from exc
