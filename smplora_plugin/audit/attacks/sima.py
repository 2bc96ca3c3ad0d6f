"""SimA (Rao, Qu & Moyer 2025, arXiv 2509.25003): the noise prediction on the clean latent."""

from __future__ import annotations

from .base import Attack


class SimAAttack(Attack):
    """SimA: ``sum |eps(z0, t)|^4`` over the latent's elements (low = member); t in 0..190 step 10,
    chosen on calibration (the official setting)."""

    name = "sima"
    title = "SimA (sum of eps(z0, t)^4, t on calibration)"

    def candidates(self, ctx):
        s = ctx.sima(True)
        return {f"t={t}": -s[:, j] for j, t in enumerate(ctx.sima_timesteps)}
