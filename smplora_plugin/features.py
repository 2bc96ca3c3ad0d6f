"""Per-sample loss maps: the proxy attacker's input."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import FeatureError

Grid = Union[int, Tuple[int, int], None]


def loss_maps(pred: torch.Tensor, target: torch.Tensor, grid: Grid = 64,
              reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element squared error ``(pred - target)^2`` in fp32, pooled per channel to ``grid``.

    ``pred`` and ``target`` are ``(B, C, H, W)`` (noise or velocity prediction and its target).
    The map is average-pooled to ``grid`` (``(h, w)`` or an int) so every resolution, aspect-ratio
    bucket or latent channel layout gives a fixed-size map; at ``H, W == grid`` pooling is the
    identity (SD1.5 at 512 px with the default 64). ``grid=None`` returns the unpooled map of any
    shape. The result keeps the autograd graph of ``pred``; take it *before* any per-sample loss
    weighting (min-SNR etc.).

    ``reference`` (the base model's prediction at the same noisy input, LoRA disabled) gives the
    base-calibrated map ``(pred - target)^2 - (reference - target)^2``.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise FeatureError("pred and target must be torch tensors (the model output and its training target).")
    if pred.shape != target.shape:
        raise FeatureError(
            f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}: pass the prediction "
            "and the target of the same batch (for DreamBooth prior preservation, the instance half of both)."
        )
    if pred.ndim < 2 or pred.shape[0] == 0:
        raise FeatureError(f"pred must have a batch dimension and at least one sample, got shape {tuple(pred.shape)}.")
    maps = (pred.float() - target.float()).pow(2)
    if reference is not None:
        if not isinstance(reference, torch.Tensor) or reference.shape != pred.shape:
            raise FeatureError(
                f"reference must be the base model's prediction with the shape of pred {tuple(pred.shape)}, got "
                f"{tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__}."
            )
        maps = maps - (reference.detach().float() - target.float()).pow(2)
    if grid is None:
        return maps
    size = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if maps.ndim != 4:
        raise FeatureError(
            f"pooling to feature_grid={size} needs (B, C, H, W) maps, got shape {tuple(maps.shape)}; "
            "reshape to 4-D or use feature_grid=None."
        )
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.adaptive_avg_pool2d(maps, size)


def flatten_features(feats: torch.Tensor, grid: Optional[Tuple[int, int]], name: str) -> torch.Tensor:
    """Bring loss maps ``(B, C, H, W)`` (pooled to ``grid``) or flat ``(B, D)`` features to fp32 ``(B, D)``."""
    if not isinstance(feats, torch.Tensor):
        raise FeatureError(f"{name} must be a torch.Tensor of per-sample loss maps, got {type(feats).__name__}.")
    if feats.ndim < 2:
        raise FeatureError(
            f"{name} has shape {tuple(feats.shape)}: expected (B, C, H, W) loss maps or (B, D) features "
            "with one row per sample (see smplora_plugin.loss_maps)."
        )
    if feats.shape[0] == 0:
        raise FeatureError(f"{name} is empty (batch size 0): pass at least one sample.")
    if not (feats.is_floating_point()):
        raise FeatureError(f"{name} has dtype {feats.dtype}; loss maps must be floating point.")
    if feats.ndim == 4 and grid is not None and tuple(feats.shape[-2:]) != tuple(grid):
        feats = F.adaptive_avg_pool2d(feats.float(), grid)
    return feats.float().reshape(feats.shape[0], -1)
