"""torch.distributed helpers: identical attacker updates on every rank, global loss terms."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist


def is_active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``(B_r, D)``, any ``B_r`` per rank) from every rank, in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    biggest = max(sizes)
    padded = torch.zeros((biggest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def global_terms(loss: torch.Tensor, ce_m: torch.Tensor, n_members: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Global adaptation loss and member CE, differentiable in this rank's terms only.

    The adaptation loss is the mean of the ranks' losses (equal per-rank batches) and ``CE_m``
    the mean over every rank's members. Returns ``(loss_global, ce_global, world)``: the caller
    scales the gradient of its result by ``world`` so that averaging gradients over ranks (DDP,
    accelerate) gives the gradient of the single-process objective on the global batch.
    """
    world = dist.get_world_size()
    local = torch.stack([loss.detach().float(), ce_m.detach().float() * n_members,
                         torch.tensor(float(n_members), device=loss.device)]).to(loss.device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    total = torch.stack(parts).sum(0)
    loss_g = (loss + (total[0] - local[0])) / world
    ce_g = (ce_m * n_members + (total[1] - local[1])) / total[2]
    return loss_g, ce_g, world
