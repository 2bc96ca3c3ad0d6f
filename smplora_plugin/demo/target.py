"""The tiny model seen through the audit's :class:`~smplora_plugin.audit.target.AuditTarget` protocol."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from ..errors import InputError
from .model import TinyLDM


class TinyLDMTarget:
    """AuditTarget over a :class:`TinyLDM` carrying a LoRA; ``adapter=False`` disables it (the public base).

    ``condition`` returns the caption encoder's states; the caption encoder is not adapted, so
    the same states serve the adapted and the base model.
    """

    prediction_type = "epsilon"

    def __init__(self, model: TinyLDM):
        if not model.has_lora():
            raise InputError("TinyLDMTarget needs a model with a LoRA (model.add_lora), so the base can be queried.")
        self.model = model.eval()
        self.num_train_timesteps = int(model.cfg.num_train_timesteps)
        self.alphas_cumprod = model.alphas_cumprod.detach().float().cpu().clone()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images.float())

    @torch.no_grad()
    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        if captions is None:
            raise InputError("condition(None) needs a batch size: pass a list of captions ('' for unconditional).")
        return self.model.text(list(captions))

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        with self.model.adapter(adapter):
            return self.model.predict(z_t.float(), t, cond)

    # -- optional capabilities ("gradients", "decode") -------------------------------------
    def adapter_parameters(self) -> Dict[str, torch.nn.Parameter]:
        """The LoRA parameters of the UNet, by name."""
        return {n: p for n, p in self.model.unet.named_parameters() if ".lora_" in n}

    def eps_grad(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The adapted model's noise prediction, differentiable w.r.t. :meth:`adapter_parameters`."""
        with torch.enable_grad(), self.model.adapter(True):
            return self.model.predict(z_t.float(), t, cond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (the exact pixel-shuffle decoder)."""
        return self.model.decode(latents.float())
