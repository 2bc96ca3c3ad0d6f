"""PIA (Kong et al., ICLR 2024): proximal initialisation with the model's own eps(z0, 0)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..config import register_options
from ..engine import ScoreContext, scale_timesteps
from ..target import AuditError
from .base import Attack


@register_options("pia", legacy_prefix="pia_")
@dataclass
class PIAOptions:
    """``timesteps`` (for T = 1000; t = 0 is dropped) and the distance's power ``p``."""

    timesteps: Tuple[int, ...] = tuple(range(10, 501, 10))
    p: float = 4.0

    def validate(self) -> None:
        if not self.timesteps:
            raise AuditError("pia_timesteps must list at least one timestep.")
        if self.p <= 0:
            raise AuditError("pia_p must be > 0 (the official setting is 4).")

    def schedule(self, T: int) -> List[int]:
        return [t for t in scale_timesteps(self.timesteps, T) if t > 0]


def pia_statistic(ctx: ScoreContext, adapter: bool = True, options: Optional[PIAOptions] = None) -> np.ndarray:
    """``(N, len(schedule))`` PIA distance ``mean |eps(z_t, t) - eps(z0, 0)|^p``, ``z_t`` noised with ``eps(z0, 0)``."""
    opts = options or ctx.config.options("pia")
    ts = opts.schedule(ctx.T)

    def compute() -> np.ndarray:
        out = np.zeros((ctx.n, len(ts)))
        bar = ctx.bar(ctx.n * (1 + len(ts)), "PIA")
        for sl in ctx.batches():
            z0, cond = ctx.latents[sl], ctx.cond(sl)
            e0 = ctx.eps(z0, 0, cond, adapter, "pia")
            bar.update(z0.shape[0])
            for j, t in enumerate(ts):
                d = (ctx.eps(ctx.noisy(z0, t, e0), t, cond, adapter, "pia") - e0).abs().pow(opts.p)
                out[sl, j] = d.flatten(1).mean(1).double().numpy()
                bar.update(z0.shape[0])
        bar.close()
        return out
    return ctx.cached(f"pia:{adapter}:{opts!r}", compute)


class PIAAttack(Attack):
    """PIA: proximal initialisation with the model's own eps(z0, 0), p = 4; t in 10..500 step 10,
    chosen on calibration. Options: :class:`PIAOptions`."""

    name = "pia"
    title = "PIA (p = 4, t on calibration)"
    option_set = "pia"

    def candidates(self, ctx: ScoreContext) -> Dict[str, np.ndarray]:
        opts = self.settings(ctx)
        s = pia_statistic(ctx, True, opts)
        return {f"t={t}": -s[:, j] for j, t in enumerate(opts.schedule(ctx.T))}
