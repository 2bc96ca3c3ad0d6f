"""SecMI_stat (Duan et al., ICML 2023): t-error after deterministic DDIM inversion."""

from __future__ import annotations

from .base import Attack


class SecMIAttack(Attack):
    """SecMI_stat: t-error after deterministic DDIM inversion (t_sec 100, step 10; low = member)."""

    name = "secmi"
    title = "SecMI (t-error, t_sec 100, k 10)"

    def candidates(self, ctx):
        return {"t_sec": -ctx.secmi(True)}
