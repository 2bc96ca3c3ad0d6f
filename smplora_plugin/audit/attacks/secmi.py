"""SecMI_stat (Duan et al., ICML 2023): t-error after deterministic DDIM inversion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..config import register_options
from ..engine import ScoreContext
from ..target import AuditError
from .base import Attack


@register_options("secmi", legacy_prefix="secmi_")
@dataclass
class SecMIOptions:
    """``t``: the t_sec candidates (for T = 1000), one shared inversion path; ``step``: its step k."""

    t: Tuple[int, ...] = (100, 150, 200)
    step: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.t, (int, float)):  # a single t_sec, as in earlier versions
            self.t = (int(self.t),)

    def validate(self) -> None:
        if self.step < 1 or not self.t or min(self.t) <= self.step:
            raise AuditError("every secmi_t candidate must be larger than secmi_step >= 1 "
                             "(defaults: [100, 150, 200] and 10).")

    def path(self, T: int) -> Tuple[List[int], int]:
        """``(t_sec candidates, k)`` at the target's ``T``: every candidate a multiple of ``k``."""
        k = max(1, int(round(self.step * T / 1000.0)))
        return sorted({min((T - 1) // k * k, k * max(1, int(round(t * T / 1000.0 / k)))) for t in self.t}), k

    def schedule(self, T: int) -> List[Any]:
        return list(self.path(T))


def secmi_statistic(ctx: ScoreContext, adapter: bool = True, options: Optional[SecMIOptions] = None) -> np.ndarray:
    """``(N, len(candidates))`` SecMI t-error for each ``t_sec`` candidate.

    One deterministic DDIM inversion path ``0 -> k -> 2k -> ...`` up to the largest ``t_sec``
    serves every candidate: for ``t_sec`` the path point at ``t_sec - k`` is stepped up to
    ``t_sec`` (that is the path's own next step) and denoised back with ``eps(z_{t_sec}, t_sec)``
    (the model call the path needs for its following step), so all candidates together cost
    ``max(t_sec) / k + 1`` passes.
    """
    opts = options or ctx.config.options("secmi")
    cands, k = opts.path(ctx.T)

    def compute() -> np.ndarray:
        top = cands[-1]
        out = np.zeros((ctx.n, len(cands)))
        bar = ctx.bar(ctx.n * (top // k + 1), "SecMI")
        for sl in ctx.batches():
            z, cond = ctx.latents[sl], ctx.cond(sl)
            prev = z
            for s in range(0, top + 1, k):
                e = ctx.eps(z, s, cond, adapter, "secmi")
                bar.update(z.shape[0])
                if s in cands:
                    back = ctx.ddim(z, s, s - k, e)
                    out[sl, cands.index(s)] = (back - prev).pow(2).flatten(1).mean(1).double().numpy()
                if s < top:
                    prev, z = z, ctx.ddim(z, s, s + k, e)
        bar.close()
        return out
    return ctx.cached(f"secmi:{adapter}:{opts!r}", compute)


class SecMIAttack(Attack):
    """SecMI_stat: t-error after deterministic DDIM inversion (low = member); t_sec in {100, 150, 200}
    (step k = 10) chosen on calibration, all candidates from one shared inversion path.
    Options: :class:`SecMIOptions`."""

    name = "secmi"
    title = "SecMI (t-error, t_sec on calibration, k 10)"
    option_set = "secmi"

    def candidates(self, ctx: ScoreContext) -> Dict[str, np.ndarray]:
        opts = self.settings(ctx)
        s = secmi_statistic(ctx, True, opts)
        return {f"t_sec={t}": -s[:, j] for j, t in enumerate(opts.path(ctx.T)[0])}
