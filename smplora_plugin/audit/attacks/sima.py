"""SimA (Rao, Qu & Moyer 2025): the noise prediction's norm on the clean latent."""

from __future__ import annotations

from .base import Attack


class SimAAttack(Attack):
    """SimA: squared norm of the noise prediction on the clean latent at small t (low = member)."""

    name = "sima"
    title = "SimA (norm of eps(z0, t), t on calibration)"

    def candidates(self, ctx):
        s = ctx.sima(True)
        return {f"t={t}": -s[:, j] for j, t in enumerate(ctx.sima_timesteps)}
