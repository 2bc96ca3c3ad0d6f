"""Per-sample gradients from a trainer's own backward pass, by module hooks (no second forward).

A trainer computes a loss that is a mean over its batch of per-sample losses and calls
``backward()``. For a leaf module ``y = x W^T + b`` (``nn.Linear``) or a convolution, the gradient
of that loss with respect to ``W`` is a sum over the batch of per-sample terms, each computed from
the sample's own input ``x_i`` and output gradient ``dL/dy_i``. :class:`GradSampleHooks` keeps the
input in a forward hook and computes the per-sample terms in a hook on the output tensor, during
the trainer's backward; :meth:`GradSampleHooks.take` hands them over per DP parameter as
``(B, *shape)`` tensors, multiplied by ``scale`` (the batch size for a mean-reduced loss) so that
row ``i`` is the gradient of sample ``i``'s own loss.

It works where the LoRA is applied by calling its ``lora_down`` / ``lora_up`` (kohya, ai-toolkit)
or ``lora_A`` / ``lora_B`` (peft) modules: the hooks fire. It does not where a trainer merges the
LoRA into the weights before the forward (ComfyUI's weight mode); there, train with batches of one
and read the gradient itself (``DPTraining(capture="grads")``).

What it checks: every DP parameter belongs to a supported leaf module (``nn.Linear``, ``nn.Conv1d``
/ ``nn.Conv2d`` with ``groups=1`` and zero padding), a module seen under ``no_grad`` is skipped (a
base or held-out forward), and all per-sample gradients of one backward have the same batch size.
A module called several times in one forward (shared weights) gets the sum of its calls' terms.
Gradient checkpointing works: the hook sits on the output tensor that backward actually reaches.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DPError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _linear_grads(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1]).float()
    g = g.reshape(b, -1, g.shape[-1]).float()
    out = {"weight": torch.einsum("bno,bni->boi", g, x)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _conv_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, torch.Tensor]:
    b = x.shape[0]
    x, g = x.float(), g.float()
    if isinstance(module, nn.Conv1d):      # as a 2-d convolution of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        padding, dilation = (0, *module.padding), (1, *module.dilation)
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)    # (b, in*k, L)
    g = g.reshape(b, g.shape[1], -1)                                                  # (b, out, L)
    out = {"weight": torch.einsum("bol,bil->boi", g, cols).reshape(b, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = g.sum(2)
    return out


def _check_module(name: str, module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED):
        raise DPError(
            f"{name} ({type(module).__name__}) holds a DP parameter, but per-sample gradients by hooks cover only "
            "nn.Linear and nn.Conv1d/2d LoRA layers: train a plain LoRA (no DoRA magnitude, no trainable alpha or "
            "norm), or use DPGradients.accumulate(..., method='loop') in a raw loop."
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise DPError(f"{name}: a convolution with groups={module.groups}, padding_mode={module.padding_mode!r}, "
                          f"padding={module.padding!r} is not supported by the per-sample hooks (groups=1, numeric "
                          "zero padding only).")


class GradSampleHooks:
    """Hooks on the leaf modules that own ``params``; per-sample gradients of each backward, by parameter.

    Args:
        root: the module tree that holds the LoRA layers (kohya's network, a peft model, ...).
        params: the DP parameters, in the order :meth:`take` returns them; each must be the ``weight`` or
            ``bias`` of a supported leaf module under ``root``.
    """

    def __init__(self, root: nn.Module, params: Sequence[torch.Tensor]):
        owners: Dict[int, Tuple[str, nn.Module, str]] = {}
        for mname, module in root.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), (mname, module, pname))
        self.slots: Dict[int, int] = {id(p): i for i, p in enumerate(params)}
        self.shapes = [tuple(p.shape) for p in params]
        modules: Dict[int, nn.Module] = {}
        for p in params:
            if id(p) not in owners:
                raise DPError("a DP parameter is not a parameter of the module the hooks were given: pass the LoRA "
                              "network (the module tree holding its lora_down/lora_up or lora_A/lora_B layers).")
            mname, module, _ = owners[id(p)]
            _check_module(mname or type(root).__name__, module)
            modules[id(module)] = module
        self._modules = list(modules.values())
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._grads: List[Optional[torch.Tensor]] = [None] * len(params)
        self._batch: Optional[int] = None

    # ------------------------------------------------------------------ life cycle
    def attach(self) -> "GradSampleHooks":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._forward) for m in self._modules]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def pending(self) -> bool:
        """Whether a backward left per-sample gradients not yet taken."""
        return self._batch is not None

    # ------------------------------------------------------------------ hooks
    def _forward(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return     # a no-grad forward (base prediction, held-out rows): nothing to privatise
        if not any(p.requires_grad and id(p) in self.slots for p in module.parameters(recurse=False)):
            return
        x = inputs[0].detach()
        output.register_hook(lambda g, m=module, x=x: self._backward(m, x, g))

    def _backward(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        grads = _linear_grads(module, x, g) if isinstance(module, nn.Linear) else _conv_grads(module, x, g)
        for pname, gs in grads.items():
            p = getattr(module, pname)
            slot = self.slots.get(id(p))
            if slot is None or not p.requires_grad:
                continue
            if self._batch is None:
                self._batch = gs.shape[0]
            elif gs.shape[0] != self._batch:
                self._batch = -1       # refused in take(): samples do not line up across modules
            if self._grads[slot] is None:
                self._grads[slot] = gs
            elif self._grads[slot].shape == gs.shape:
                self._grads[slot] = self._grads[slot] + gs
            else:
                self._batch = -1

    # ------------------------------------------------------------------ hand-over
    def take(self, scale: float = 1.0, *, mean_reduced: bool = True) -> Optional[List[torch.Tensor]]:
        """The per-sample gradients of the backward passes since the last call, one ``(B, *shape)`` tensor per DP
        parameter (zeros for a parameter the backward did not reach), times ``scale`` and, for a loss that was the
        mean over the batch (``mean_reduced``), times ``B``: row ``i`` is then the gradient of sample ``i``'s own
        loss. ``None`` when no backward ran. Clears them."""
        batch, grads = self._batch, self._grads
        self._grads, self._batch = [None] * len(self.shapes), None
        if batch is None:
            return None
        if batch < 0:
            raise DPError("the per-sample gradients of one backward have different batch sizes across LoRA layers "
                          "(a layer saw a reshaped or repeated batch, or two forwards were summed into one loss "
                          "without a step between them): per-sample gradients by hooks need every LoRA layer to see "
                          "the batch's samples on dimension 0.")
        factor = float(scale) * (batch if mean_reduced else 1)
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        return [(torch.zeros((batch, *shape), device=device) if g is None else g) * factor
                for g, shape in zip(grads, self.shapes)]
