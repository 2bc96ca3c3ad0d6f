"""Per-sample loss maps: the proxy attacker's input."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import FeatureError

Grid = Union[int, Tuple[int, int], None]


def pooled_size(hw: Tuple[int, int], grid: Tuple[int, int]) -> Tuple[int, int]:
    """The size a ``hw`` map is pooled to under ``grid``: ``grid``, capped per side at the map's own size
    (a map is never pooled up: that would only repeat its values and inflate the attacker)."""
    return (min(int(hw[0]), int(grid[0])), min(int(hw[1]), int(grid[1])))


def loss_maps(pred: torch.Tensor, target: torch.Tensor, grid: Grid = 16,
              reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element squared error ``(pred - target)^2`` in fp32, average-pooled per channel down to ``grid``.

    ``pred`` and ``target`` are ``(B, C, H, W)`` (noise or velocity prediction and its target).
    The map is average-pooled to ``grid`` (``(h, w)`` or an int), capped per side at ``H, W``
    (:func:`pooled_size`): a map is only ever pooled down, never up (SD1.5's 64x64 latents with the
    default 16 give 16x16 cells of 4x4; a 12x12 map stays 12x12). ``grid=None`` returns the unpooled
    map of any shape. The result keeps the autograd graph of ``pred``; take it *before* any
    per-sample loss weighting (min-SNR etc.).

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
    size = pooled_size(maps.shape[-2:], size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.adaptive_avg_pool2d(maps, size)


def flatten_features(feats: torch.Tensor, grid: Optional[Tuple[int, int]], name: str) -> torch.Tensor:
    """Bring loss maps ``(B, C, H, W)`` (adaptive-pooled to exactly ``grid`` when given) or flat ``(B, D)``
    features to fp32 ``(B, D)``. The regulariser passes its fixed input grid, so a bucket of another size
    lands on the size of the first batch's maps."""
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
