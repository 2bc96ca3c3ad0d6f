"""RMIA (Zarifzadeh et al., ICML 2024) with reference LoRAs.

``Pr(x | theta)`` of a diffusion model, from its loss: ``exp(-mean_t L_t(x, theta) / Lbar_t)``
where ``L_t`` is the mean squared noise error over the audit's noise draws at grid timestep ``t``
and ``Lbar_t`` the target's mean of it over the population samples (so a typical sample has
``Pr`` near ``e^-1`` and every timestep weighs the same; ``Lbar`` plays the temperature).
``Pr(x)`` averages ``Pr(x | theta_r)`` over the references: all of them (online), or, offline,
the paper's linear approximation from the OUT references ``((1 + a) Pr_out(x) + 1 - a) / 2``.
The population samples ``z`` are the calibration non-members. The paper's score of ``x`` is the
fraction of ``z`` (other than ``x``) with ``LR(x) / LR(z) > gamma``, ``LR = Pr(. | theta) / Pr(.)``; it
takes only ``len(population) + 1`` values, so against a strong leak members tie at the top with a few
non-members and the TPR at a low FPR cannot be resolved (0% at AUC 0.96 on the emoji frontier). The
score used here refines it without changing it: within each step ``k / n`` the sample's position
between the two population thresholds around its ``log LR(x)`` (linear; past the largest or below the
smallest threshold a bounded rational tail, ``d / (d + s)``, with ``s`` the population's spread of
``log LR``). A population sample meets the other ``P - 1``; a sample outside the population (every audited
one but the calibration non-members) scores the mean over ``z`` of its refined score against the population
less ``z``, so that both meet ``P - 1`` and read alike under no signal. A sample whose paper score is
``k / n`` scores in ``[k / n, k / n + 1 / (P - 1)]``, and outside the population the score is continuous and
strictly increasing in ``LR(x)``. ``gamma`` (and ``a`` offline) are chosen on the calibration split.
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
                gamma: float, a: Optional[float] = None, *, continuous: bool = True) -> np.ndarray:
    """RMIA scores ``(N,)``: fraction of population ``z != x`` with ``LR(x) / LR(z) > gamma``.

    ``a=None``: online ``Pr(x)`` (mean over all references); otherwise offline with parameter ``a``.
    ``continuous=False``: the paper's fraction (``len(population) + 1`` values, ties at the top);
    ``True`` (the attack's): the fraction plus the sample's position within its step (module docstring),
    which breaks the ties: a sample whose fraction is ``k / n`` scores in ``[k / n, (k + 1) / n]``.
    """
    if a is None:
        px = pr_refs.mean(0)
    else:
        out = ~inside
        if out.sum(0).min() < 1:
            raise AuditError("offline RMIA needs at least one OUT reference for every sample.")
        p_out = (pr_refs * out).sum(0) / out.sum(0)
        px = 0.5 * ((1 + a) * p_out + (1 - a))
    ell = np.log(np.maximum(pr_target, 1e-300)) - np.log(np.maximum(px, 1e-300))  # log LR(x)
    thr = ell[population] + np.log(gamma) + np.log1p(1e-9)  # (P,) LR(x) must beat gamma LR(z); rounding is no evidence
    other = population[None, :] != np.arange(ell.size)[:, None]  # (N, P): z != x
    above = (ell[:, None] > thr[None, :]) & other
    count = above.sum(1)
    n = np.maximum(other.sum(1), 1)
    if not continuous:
        return count / n
    spread = float(np.std(thr)) if thr.size > 1 else 0.0
    if not np.isfinite(spread) or spread <= 1e-12:
        spread = max(float(np.std(ell)), 1e-12) if ell.size > 1 else 1.0
    t = np.broadcast_to(thr[None, :], above.shape)
    lo = np.where(above, t, -np.inf)  # (N, P): the thresholds x beats
    hi = np.where(other & ~above, t, np.inf)  # the ones it does not beat
    score = (count + _position(ell, lo.max(1), hi.min(1), count, n, spread)) / n
    outside = other.all(1)  # samples that are not in the population: every audited one but the calibration non-members
    if population.size > 1 and outside.any():
        score[outside] = _leave_one_out(ell[outside], lo[outside], hi[outside], count[outside], population.size,
                                        spread)
    return score


def _position(ell: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: np.ndarray, n: np.ndarray,
              spread: float) -> np.ndarray:
    """Each sample's position in ``[0, 1]`` between the population thresholds just below (``lo``, ``-inf``: none) and
    just above (``hi``, ``+inf``: none) its ``log LR(x)``; ``count`` thresholds beaten of ``n`` (any shapes that
    broadcast)."""
    ell, lo, hi, count, n = np.broadcast_arrays(ell, lo, hi, count, n)
    pos = np.zeros(ell.shape)
    mid = (count > 0) & (count < n)
    pos[mid] = (ell[mid] - lo[mid]) / (hi[mid] - lo[mid])
    top = (count >= n) & np.isfinite(lo)
    d = ell[top] - lo[top]
    pos[top] = d / (d + spread)
    low = (count == 0) & np.isfinite(hi)
    pos[low] = spread / (spread + hi[low] - ell[low])
    return np.clip(pos, 0.0, 1.0)


def _leave_one_out(ell: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: np.ndarray, n_pop: int,
                   spread: float) -> np.ndarray:
    """The scores of samples outside the population ``(M,)``, each the mean over the population of its score against
    the population less one sample (``lo`` / ``hi``: ``(M, P)``, its beaten / unbeaten thresholds).

    A calibration non-member is scored against the other ``P - 1`` population samples; scored against all ``P``,
    an audited sample's ``1 / n`` steps were finer, and where the log-LR spread is small beside ``log gamma`` (no
    sample beats any threshold, only the position counts) the calibration non-members outscored the calibration
    members under no signal at all: a calibration AUC near 0, read as 1 after the sign flip. Against ``P - 1``
    each, both sides score alike; the mean over the left-out sample keeps the score strictly increasing in
    ``LR(x)`` (a mean of increasing functions)."""
    beats = np.isfinite(lo)  # (M, P)
    count_z = count[:, None] - beats  # (M, P): thresholds beaten without z
    m = np.arange(ell.size)[:, None]

    def without(a: np.ndarray, largest: bool) -> np.ndarray:
        # the extreme of each row without column z: the row's extreme, or its runner-up in the extreme's column
        order = np.argsort(a, axis=1)
        first, second = (order[:, -1], order[:, -2]) if largest else (order[:, 0], order[:, 1])
        out = np.broadcast_to(a[m[:, 0], first][:, None], a.shape).copy()
        out[m[:, 0], first] = a[m[:, 0], second]
        return out

    pos = _position(ell[:, None], without(lo, True), without(hi, False), count_z, n_pop - 1, spread)
    return ((count_z + pos) / (n_pop - 1)).mean(1)


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
