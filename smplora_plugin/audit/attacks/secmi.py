"""SecMI_stat (Duan et al., ICML 2023): t-error after deterministic DDIM inversion."""

from __future__ import annotations

from .base import Attack


class SecMIAttack(Attack):
    """SecMI_stat: t-error after deterministic DDIM inversion (low = member); t_sec in {100, 150, 200}
    (step k = 10) chosen on calibration, all candidates from one shared inversion path."""

    name = "secmi"
    title = "SecMI (t-error, t_sec on calibration, k 10)"

    def candidates(self, ctx):
        s = ctx.secmi(True)
        return {f"t_sec={t}": -s[:, j] for j, t in enumerate(ctx.secmi_t)}
