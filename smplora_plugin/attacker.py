"""The proxy attacker: an MLP on flattened per-sample loss maps (paper: D -> 512 -> 256 -> 2)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProxyAttacker(nn.Module):
    """Member / non-member classifier on loss maps; logits ``(B, 2)``, class 1 = member.

    Dropout is applied with an explicit :class:`torch.Generator` so that training is
    reproducible and resumable; it is active only in train mode. Weights are fp32 whatever
    ``torch.get_default_dtype()`` is (a trainer may set it to bf16 / fp16).
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (512, 256), dropout: float = 0.5, *, seed: int = 0):
        super().__init__()
        self.in_features = int(in_features)
        self.dropout = float(dropout)
        widths = [self.in_features, *hidden, 2]
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=torch.float32) for a, b in zip(widths[:-1], widths[1:]))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) init (PyTorch's Linear default) from ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        for layer in self.layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        *hidden_layers, last = self.layers
        for layer in hidden_layers:
            x = F.relu(layer(x))
            if self.training and self.dropout > 0:
                keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= self.dropout
                x = x * keep / (1.0 - self.dropout)
        return last(x)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits through detached weights: gradients reach ``x`` but never the attacker
        (what ``torch.func.functional_call`` with detached parameters gives, without its per-call overhead)."""
        *hidden_layers, last = self.layers
        for layer in hidden_layers:
            x = F.relu(F.linear(x, layer.weight.detach(), layer.bias.detach()))
        return F.linear(x, last.weight.detach(), last.bias.detach())


def attacker_optimizer(attacker: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam for the attacker, with PyTorch's fused kernel where it has one (CPU, CUDA): the same update rule
    in one kernel per step instead of a dozen elementwise passes, about 3x faster on CPU at the default sizes
    (benchmarks/RESULTS.md). A state saved without it resumes as it was saved (its ``fused`` flag is part of
    the saved param groups)."""
    device = next(attacker.parameters()).device
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(attacker.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):   # a build without the fused kernel for this device
            pass
    return torch.optim.Adam(attacker.parameters(), lr=lr, weight_decay=weight_decay)

