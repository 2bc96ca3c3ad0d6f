"""CLiD (Zhai et al., NeurIPS 2024): the loss gap between the full and reduced captions."""

from __future__ import annotations

import numpy as np

from .base import Attack, _pick


class CLiDAttack(Attack):
    """CLiD_th: robust-scaled mix of the reduced-caption loss gap and the conditional loss.

    ``alpha`` in {0, .25, .5, .75, 1} and the robust scalers (median / IQR) are fitted on the
    calibration split.
    """

    name = "clid"
    title = "CLiD (caption-reduced loss gap)"
    needs_captions = True

    def run(self, ctx, cal_index, cal_labels):
        cond, red = ctx.clid()
        gap = (red - cond[:, None, :]).mean((1, 2))  # high = member
        neg_loss = -cond.mean(1)  # high = member
        def scaler(v):
            med = np.median(v[cal_index])
            iqr = np.subtract(*np.percentile(v[cal_index], [75, 25])) or 1.0
            return (v - med) / iqr
        sg, sl = scaler(gap), scaler(neg_loss)
        cands = {f"alpha={a}": a * sg + (1 - a) * sl for a in (0.0, 0.25, 0.5, 0.75, 1.0)}
        out = _pick(cands, cal_index, cal_labels)
        out.curves = {"reductions": {f"D{i + 1}": (red[:, i] - cond).mean(1) for i in range(red.shape[1])}}
        return out
