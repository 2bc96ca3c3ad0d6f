"""SimA (Rao, Qu & Moyer 2025, arXiv 2509.25003): the noise prediction on the clean latent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..config import register_options
from ..engine import ScoreContext, scale_timesteps
from ..target import AuditError
from .base import Attack


@register_options("sima", legacy_prefix="sima_")
@dataclass
class SimAOptions:
    """``timesteps`` (for T = 1000; the official grid, t = 0 included) and the norm's power ``p``."""

    timesteps: Tuple[int, ...] = tuple(range(0, 200, 10))
    p: float = 4.0

    def validate(self) -> None:
        if not self.timesteps:
            raise AuditError("sima_timesteps must list at least one timestep.")
        if self.p <= 0:
            raise AuditError("sima_p must be > 0 (the official setting is 4).")

    def schedule(self, T: int) -> List[int]:
        return scale_timesteps(self.timesteps, T)


def sima_statistic(ctx: ScoreContext, adapter: bool = True, options: Optional[SimAOptions] = None) -> np.ndarray:
    """``(N, len(schedule))`` SimA statistic ``sum |eps(z0, t)|^p`` over the latent's elements."""
    opts = options or ctx.config.options("sima")
    ts = opts.schedule(ctx.T)

    def compute() -> np.ndarray:
        out = np.zeros((ctx.n, len(ts)))
        bar = ctx.bar(ctx.n * len(ts), "SimA")
        for sl in ctx.batches():
            z0, cond = ctx.latents[sl], ctx.cond(sl)
            for j, t in enumerate(ts):
                e = ctx.eps(z0, t, cond, adapter, "sima")
                out[sl, j] = e.abs().pow(opts.p).flatten(1).sum(1).double().numpy()
                bar.update(z0.shape[0])
        bar.close()
        return out
    return ctx.cached(f"sima:{adapter}:{opts!r}", compute)


class SimAAttack(Attack):
    """SimA: ``sum |eps(z0, t)|^4`` over the latent's elements (low = member); t in 0..190 step 10,
    chosen on calibration (the official setting). Options: :class:`SimAOptions`."""

    name = "sima"
    title = "SimA (sum of eps(z0, t)^4, t on calibration)"
    option_set = "sima"

    def candidates(self, ctx: ScoreContext) -> Dict[str, np.ndarray]:
        opts = self.settings(ctx)
        s = sima_statistic(ctx, True, opts)
        return {f"t={t}": -s[:, j] for j, t in enumerate(opts.schedule(ctx.T))}
