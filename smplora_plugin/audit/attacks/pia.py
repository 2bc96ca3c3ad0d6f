"""PIA (Kong et al., ICLR 2024): proximal initialisation with the model's own eps(z0, 0)."""

from __future__ import annotations

from .base import Attack


class PIAAttack(Attack):
    """PIA: proximal initialisation with the model's own eps(z0, 0), p = 4; t in 10..500 step 10,
    chosen on calibration."""

    name = "pia"
    title = "PIA (p = 4, t on calibration)"

    def candidates(self, ctx):
        s = ctx.pia(True)
        return {f"t={t}": -s[:, j] for j, t in enumerate(ctx.pia_timesteps)}
