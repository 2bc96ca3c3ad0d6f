"""The proxy attacker: an MLP on flattened per-sample loss maps (paper: D -> 512 -> 256 -> 2), its Adam, and
the optimiser state in the flat form a state file holds."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import StateError


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


def optimizer_state(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``optimizer.state_dict()`` split for a state file: its tensors as ``{"<index>.<key>": CPU copy}`` and the
    rest as JSON-able ``{"param_groups": [...], "scalars": {"<index>": {key: value}}, "indices": [...]}``."""
    osd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars,
                     "indices": sorted(int(i) for i in osd["state"])}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Any) -> None:
    """Load :func:`optimizer_state` output into ``optimizer``, a fresh one, after checking it against the
    optimiser's parameters: the param groups, every index, and each tensor's shape (a moment has its
    parameter's, ``step`` is a scalar), dtype (fp32) and Adam's keys. Raises :class:`StateError` naming the entry."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        groups, scalars, indices = meta["param_groups"], meta["scalars"], [int(i) for i in meta["indices"]]
        saved_ids = [list(g["params"]) for g in groups]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"the attacker optimiser state has no valid param groups or indices ({exc}); the file is "
                         "corrupt: re-save it with reg.save().") from exc
    if saved_ids != [g["params"] for g in optimizer.state_dict()["param_groups"]]:
        raise StateError(f"the attacker optimiser state is for parameters {saved_ids}, not this attacker's "
                         f"{len(params)}; the file is corrupt or from another version.")
    if not isinstance(scalars, dict) or not set(scalars) <= {str(i) for i in indices} or \
            not all(isinstance(v, dict) for v in scalars.values()):
        raise StateError("the attacker optimiser state's non-tensor entries do not match its indices; the file "
                         "is corrupt: re-save it with reg.save().")
    if not set(indices) <= set(range(len(params))):
        raise StateError(f"the attacker optimiser state lists indices {indices} for an attacker of {len(params)} "
                         "parameters; the file is corrupt: re-save it with reg.save().")
    state: Dict[int, Dict[str, Any]] = {i: dict(scalars.get(str(i), {})) for i in indices}
    for name, value in tensors.items():
        idx, _, key = name.partition(".")
        if not idx.isdigit() or int(idx) not in state or not key:
            raise StateError(f"unexpected attacker optimiser entry optimizer.{name} (saved indices {indices}); the "
                             "file is corrupt: re-save it with reg.save().")
        param = params[int(idx)]
        if key == "step":   # a scalar, float32 or float64 (torch's default scalar dtype)
            ok, want = value.shape == torch.Size([]) and value.is_floating_point(), "a floating-point scalar"
        else:               # a moment: the parameter's shape and dtype
            ok = value.shape == param.shape and value.dtype == param.dtype
            want = f"{_dtype(param)} {tuple(param.shape)}"
        if not ok:
            raise StateError(f"optimizer.{name} is {_dtype(value)} {tuple(value.shape)} but this attacker's Adam "
                             f"state holds {want} there; the file is corrupt or was converted after saving: resume "
                             "from the file as saved.")
        state[int(idx)][key] = value.clone()   # the optimiser steps its state in place
    want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if any(g.get("amsgrad") for g in groups) else set())
    for idx, entry in state.items():
        if set(entry) != want:
            raise StateError(f"the attacker optimiser state of parameter {idx} holds {sorted(entry)}, but Adam's is "
                             f"{sorted(want)}; the file is corrupt: re-save it with reg.save().")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateError(f"the attacker optimiser state is corrupt ({exc}); re-save it with reg.save().") from exc


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")
