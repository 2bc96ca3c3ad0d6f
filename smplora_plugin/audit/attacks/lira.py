"""LiRA (Carlini et al., S&P 2022), online and offline, with reference LoRAs.

Statistic of a sample under a model, per grid timestep: the log of its mean squared noise error
over the audit's noise draws (the same ``(t, noise)`` draws for the target and every reference:
common random numbers). Per sample and timestep, Gaussians are fitted to the references' values:
IN (references that trained on the sample) and OUT (those that did not). When some sample has
fewer than ``min_count`` references on a side, that side uses one variance per timestep pooled
over all samples (the fixed-variance variant of Carlini et al.); the means stay per sample.

- online: ``sum_t [log N(x_t; mu_in, s_in) - log N(x_t; mu_out, s_out)]``;
- offline: ``sum_t (mu_out - x_t) / s_out``, a one-sided z-score against OUT (low loss = member).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..target import AuditError
from .base import Attack

MIN_COUNT = 4  # fewer IN (or OUT) references for some sample: pooled (global) variance on that side
_VAR_FLOOR = 1e-12


def lira_statistic(grid: np.ndarray) -> np.ndarray:
    """``(..., K, M)`` loss grid -> ``(..., K)`` log of the mean loss over the noise draws."""
    return np.log(np.maximum(np.asarray(grid, dtype=np.float64).mean(-1), 1e-30))


def fit_gaussians(ref_stat: np.ndarray, mask: np.ndarray,
                  min_count: int = MIN_COUNT) -> Tuple[np.ndarray, np.ndarray, bool]:
    """Per-sample Gaussians of ``ref_stat`` ``(R, N, K)`` over the references where ``mask`` ``(R, N)``.

    Returns ``(mu (N, K), var (N, K), pooled)``; ``pooled`` is True when the variance is one per
    timestep, pooled over samples (some sample has fewer than ``min_count`` references).
    """
    cnt = mask.sum(0).astype(np.float64)  # (N,)
    if cnt.min() < 1:
        raise AuditError("a sample has no reference model on one side (IN or OUT); LiRA cannot score it.")
    w = mask[:, :, None].astype(np.float64)
    mu = (ref_stat * w).sum(0) / cnt[:, None]
    resid2 = ((ref_stat - mu[None]) ** 2 * w).sum(0)  # (N, K)
    if cnt.min() >= min_count:
        var = resid2 / (cnt - 1)[:, None]
        pooled = False
    else:
        dof = (cnt - 1).sum()
        if dof > 0:
            var_k = resid2.sum(0) / dof
        else:  # one reference per sample on this side: the spread of the values across samples
            vals = np.stack([ref_stat[mask[:, i], i] for i in range(mask.shape[1])])  # (N, 1, K)
            flat = vals.reshape(-1, ref_stat.shape[-1])
            var_k = flat.var(0, ddof=1) if mask.shape[1] > 1 else np.ones(ref_stat.shape[-1])
        var = np.broadcast_to(var_k, mu.shape).copy()
        pooled = True
    return mu, np.maximum(var, _VAR_FLOOR), pooled


def _log_normal(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * np.log(2 * np.pi * var) - (x - mu) ** 2 / (2 * var)


def lira_online_terms(x: np.ndarray, ref_stat: np.ndarray, inside: np.ndarray,
                      min_count: int = MIN_COUNT) -> Tuple[np.ndarray, Dict[str, bool]]:
    """Per-timestep online LiRA log-likelihood ratios ``(N, K)``; x ``(N, K)``, ref_stat ``(R, N, K)``."""
    mu_in, var_in, p_in = fit_gaussians(ref_stat, inside, min_count)
    mu_out, var_out, p_out = fit_gaussians(ref_stat, ~inside, min_count)
    terms = _log_normal(x, mu_in, var_in) - _log_normal(x, mu_out, var_out)
    return terms, {"pooled_variance_in": p_in, "pooled_variance_out": p_out}


def lira_offline_terms(x: np.ndarray, ref_stat: np.ndarray, inside: np.ndarray,
                       min_count: int = MIN_COUNT) -> Tuple[np.ndarray, Dict[str, bool]]:
    """Per-timestep offline LiRA z-scores ``(N, K)`` against the OUT references (high = member)."""
    mu_out, var_out, p_out = fit_gaussians(ref_stat, ~inside, min_count)
    return (mu_out - x) / np.sqrt(var_out), {"pooled_variance_out": p_out}


class _LiRA(Attack):
    online = True

    def candidates(self, ctx):
        terms, _ = self._terms(ctx)
        return {"sum over t": terms.sum(1)}

    def curves(self, ctx):
        terms, _ = self._terms(ctx)
        return {"per_timestep": {f"t={t}": terms[:, k] for k, t in enumerate(ctx.timesteps)}}

    def _terms(self, ctx):
        def compute():
            if ctx.references is None:
                raise AuditError(f"attack {self.name!r} needs reference models (run_audit(..., references=...)).")
            x = lira_statistic(ctx.loss_grid(True))
            ref = lira_statistic(ctx.reference_grids())
            fn = lira_online_terms if self.online else lira_offline_terms
            return fn(x, ref, ctx.references.inside, int(self.options.get("min_count", MIN_COUNT)))
        return ctx.cached(f"lira:{self.name}", compute, views=False)

    def run(self, ctx, cal_index, cal_labels):
        out = super().run(ctx, cal_index, cal_labels)
        _, flags = self._terms(ctx)
        out.chosen.update(flags)
        out.chosen["references"] = len(ctx.references)
        return out


class LiRAOnlineAttack(_LiRA):
    """Online LiRA: per-example IN and OUT Gaussians of the log loss per timestep (needs online references)."""

    name = "lira_online"
    title = "LiRA online (reference LoRAs)"
    needs_references = "online"
    online = True


class LiRAOfflineAttack(_LiRA):
    """Offline LiRA: one-sided z-score of the log loss against each sample's OUT references."""

    name = "lira_offline"
    title = "LiRA offline (reference LoRAs)"
    needs_references = "any"
    online = False
