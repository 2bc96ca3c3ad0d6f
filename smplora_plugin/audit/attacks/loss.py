"""Loss family: mean loss, base-calibrated loss and the best single timestep."""

from __future__ import annotations

from typing import Dict

import numpy as np

from ..engine import ScoreContext
from .base import Attack


def _per_t(ctx: ScoreContext, grid: np.ndarray, sign: float = -1.0) -> Dict[str, np.ndarray]:
    return {f"t={t}": sign * grid[:, k, :].mean(1) for k, t in enumerate(ctx.timesteps)}


class LossAttack(Attack):
    """Denoising loss averaged over the timestep grid and the noise draws (low = member)."""

    name = "loss"
    title = "Loss (t-grid x noise draws)"

    def candidates(self, ctx):
        return {"mean": -ctx.loss_grid(True).mean((1, 2))}

    def curves(self, ctx):
        return {"per_timestep": _per_t(ctx, ctx.loss_grid(True))}


class CalibratedLossAttack(Attack):
    """Loss minus the base model's loss at the same draws (difficulty calibration; low = member)."""

    name = "loss_calibrated"
    title = "Loss - base loss (calibrated)"

    def _delta(self, ctx):
        return ctx.loss_grid(True) - ctx.loss_grid(False)

    def candidates(self, ctx):
        return {"mean": -self._delta(ctx).mean((1, 2))}

    def curves(self, ctx):
        return {"per_timestep": _per_t(ctx, self._delta(ctx))}


class BestTimestepLossAttack(Attack):
    """Single-timestep loss or calibrated loss; the timestep and variant are chosen on calibration."""

    name = "loss_best_t"
    title = "Loss at best t (chosen on calibration)"

    def candidates(self, ctx):
        raw = {f"loss {k}": v for k, v in _per_t(ctx, ctx.loss_grid(True)).items()}
        cal = {f"calibrated {k}": v for k, v in _per_t(ctx, ctx.loss_grid(True) - ctx.loss_grid(False)).items()}
        return {**raw, **cal}
