"""Switching a peft LoRA off for the base model's prediction (calibrated features), under accelerate's wrappers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List

import torch

from smplora_plugin.errors import FeatureError
from smplora_plugin.integrations._common import unwrap


def _has_adapter_switch(model: Any) -> bool:
    return callable(getattr(model, "disable_adapter", None)) or (
        callable(getattr(model, "disable_adapters", None)) and callable(getattr(model, "enable_adapters", None)))


def unwrap_model(model: Any, accelerator: Any = None) -> Any:
    """The model under accelerate / DDP / ``torch.compile`` wrappers (where the peft adapter methods live)."""
    return unwrap(model, accelerator, until=_has_adapter_switch)


def _peft_layer_flags(model: torch.nn.Module) -> List[bool]:
    """``disable_adapters`` flags of the peft tuner layers (a bool property on peft's BaseTunerLayer)."""
    return [m.disable_adapters for m in model.modules() if isinstance(getattr(m, "disable_adapters", None), bool)]


@contextmanager
def adapters_disabled(model: Any, accelerator: Any = None) -> Iterator[Any]:
    """Run the block with the model's LoRA adapters off (the base model), then switch them back on.

    ``model`` may be wrapped by ``accelerator.prepare`` (DDP, autocast, ``torch.compile``): the
    adapters are switched on the unwrapped model, and calling the wrapped one inside the block is
    fine. Works with diffusers / transformers models (``disable_adapters`` / ``enable_adapters``)
    and peft ``PeftModel`` (``disable_adapter()``). Adapters already off stay off.
    """
    base = unwrap_model(model, accelerator)
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: only the diffusers methods can apply
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(base, PeftModel):
        with base.disable_adapter():
            yield base
        return
    if not (callable(getattr(base, "disable_adapters", None)) and callable(getattr(base, "enable_adapters", None))):
        raise FeatureError(
            f"cannot disable the LoRA of {type(base).__name__}: it has no disable_adapters()/enable_adapters() "
            "(diffusers/transformers with peft) nor disable_adapter() (peft PeftModel). Add the LoRA with "
            "unet.add_adapter(LoraConfig(...)), or pass calibrated=False.")
    flags = _peft_layer_flags(base)
    if flags and all(flags):  # already the base model
        yield base
        return
    base.disable_adapters()
    try:
        yield base
    finally:
        base.enable_adapters()


def base_prediction(model: Any, fn: Callable[[], torch.Tensor], accelerator: Any = None) -> torch.Tensor:
    """``fn()`` (the script's model call, e.g. ``lambda: unet(x, t, c, return_dict=False)[0]``) run under
    ``torch.no_grad()`` with the adapters of ``model`` disabled: the base model's prediction, detached."""
    with torch.no_grad(), adapters_disabled(model, accelerator):
        out = fn()
    if not isinstance(out, torch.Tensor):
        raise FeatureError(f"the base forward returned {type(out).__name__}, not the prediction tensor: make it "
                           "return the tensor, e.g. lambda: unet(noisy_latents, timesteps, encoder_hidden_states, "
                           "return_dict=False)[0].")
    return out.detach()
