"""RMIA (Zarifzadeh et al., ICML 2024) with reference LoRAs.

``Pr(x | theta)`` of a diffusion model, from its loss: ``exp(-mean_t L_t(x, theta) / Lbar_t)``
where ``L_t`` is the mean squared noise error over the audit's noise draws at grid timestep ``t``
and ``Lbar_t`` the target's mean of it over the population samples (so a typical sample has
``Pr`` near ``e^-1`` and every timestep weighs the same; ``Lbar`` plays the temperature).
``Pr(x)`` averages ``Pr(x | theta_r)`` over the references: all of them (online), or, offline,
the paper's linear approximation from the OUT references ``((1 + a) Pr_out(x) + 1 - a) / 2``.
The population samples ``z`` are the calibration non-members; the score of ``x`` is the fraction
of ``z`` (other than ``x``) with ``LR(x) / LR(z) > gamma``, ``LR = Pr(. | theta) / Pr(.)``.
``gamma`` (and ``a`` offline) are chosen on the calibration split. The score takes only
``len(population) + 1`` values, so against a strong leak members tie at the top and the TPR at a low
FPR can be 0 while the AUC is high (docs/audit.md); read TPR at low FPR from the report's upper
envelope.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from ..target import AuditError
from .base import Attack, _pick

GAMMAS = (1.0, 1.1, 1.25, 1.5, 2.0)
OFFLINE_A = (0.0, 0.25, 0.5, 0.75, 1.0)


def rmia_probabilities(grid: np.ndarray, ref_grids: np.ndarray,
                       population: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``Pr(x | target)`` ``(N,)`` and ``Pr(x | reference r)`` ``(R, N)`` from loss grids ``(.., N, K, M)``."""
    L = np.asarray(grid, dtype=np.float64).mean(-1)  # (N, K)
    Lr = np.asarray(ref_grids, dtype=np.float64).mean(-1)  # (R, N, K)
    scale = np.maximum(L[population].mean(0), 1e-30)  # (K,)
    return np.exp(-(L / scale).mean(-1)), np.exp(-(Lr / scale).mean(-1))


def rmia_scores(pr_target: np.ndarray, pr_refs: np.ndarray, inside: np.ndarray, population: np.ndarray,
                gamma: float, a: Optional[float] = None) -> np.ndarray:
    """RMIA scores ``(N,)``: fraction of population ``z != x`` with ``LR(x) / LR(z) > gamma``.

    ``a=None``: online ``Pr(x)`` (mean over all references); otherwise offline with parameter ``a``.
    """
    if a is None:
        px = pr_refs.mean(0)
    else:
        out = ~inside
        if out.sum(0).min() < 1:
            raise AuditError("offline RMIA needs at least one OUT reference for every sample.")
        p_out = (pr_refs * out).sum(0) / out.sum(0)
        px = 0.5 * ((1 + a) * p_out + (1 - a))
    lr = pr_target / np.maximum(px, 1e-300)
    hits = lr[:, None] > gamma * lr[None, population] * (1 + 1e-9)  # (N, P); rounding is no evidence
    self_hit = population[None, :] == np.arange(lr.size)[:, None]
    hits &= ~self_hit
    denom = population.size - self_hit.sum(1)
    return hits.sum(1) / np.maximum(denom, 1)


class RMIAAttack(Attack):
    """RMIA: pairwise likelihood-ratio test against population samples (online or offline by the references)."""

    name = "rmia"
    title = "RMIA (reference LoRAs)"
    needs_references = "any"

    def run(self, ctx, cal_index, cal_labels):
        if ctx.references is None:
            raise AuditError("attack 'rmia' needs reference models (run_audit(..., references=...)).")
        population = np.asarray(cal_index)[np.asarray(cal_labels) == 0]
        pr_t, pr_r = rmia_probabilities(ctx.loss_grid(True), ctx.reference_grids(), population)
        inside = ctx.references.inside
        online = ctx.references.mode == "online"
        cands: Dict[str, np.ndarray] = {}
        for g in self.options.get("gammas", GAMMAS):
            if online:
                cands[f"gamma={g}"] = rmia_scores(pr_t, pr_r, inside, population, g)
            else:
                for a in self.options.get("a_values", OFFLINE_A):
                    cands[f"gamma={g}, a={a}"] = rmia_scores(pr_t, pr_r, inside, population, g, a)
        out = _pick(cands, cal_index, cal_labels)
        out.chosen.update({"variant": ctx.references.mode, "references": len(ctx.references),
                           "population": "calibration non-members"})
        return out
