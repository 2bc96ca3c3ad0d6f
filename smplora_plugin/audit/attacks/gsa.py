"""GSA, the gradient-subspace attack (Pang et al., PoPETs 2025), on the LoRA parameters only.

Per sample, the denoising loss averaged over a few ``(t, noise)`` pairs is differentiated w.r.t.
the LoRA parameters; the feature vector is the gradient norm of each LoRA module (``lora_A`` and
``lora_B`` of one layer together). A classifier fitted on the calibration split, with
out-of-fold calibration scores, turns the log-norms into a membership score. Members sit near a
minimum of the loss the LoRA was trained on, so their gradients are small.

Needs the target's ``"gradients"`` capability (``adapter_parameters()`` and ``eps_grad``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from .. import metrics as M
from ..engine import ScoreContext, scale_timesteps
from ..target import AuditError
from .base import Attack, AttackOutput

GSA_TIMESTEPS: Tuple[int, ...] = (100, 200, 300, 400)  # for T = 1000; pair k uses noise draw k mod M


def lora_modules(names: Sequence[str]) -> Dict[str, List[str]]:
    """Group LoRA parameter names by module: the text before ``.lora_`` (``...to_q.lora_A.x.weight``)."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        if ".lora_" not in n:
            raise AuditError(f"adapter parameter {n!r} has no '.lora_' in its name; adapter_parameters() must "
                             "name LoRA parameters as '<module>.lora_<A|B|...>...'.")
        groups.setdefault(n.split(".lora_")[0], []).append(n)
    return groups


def gsa_pairs(ctx: ScoreContext, timesteps: Sequence[int] = GSA_TIMESTEPS) -> List[Tuple[int, int]]:
    """The ``(t, noise draw)`` pairs of the GSA loss, ``t`` rescaled to the target's T."""
    ts = [t for t in scale_timesteps(timesteps, ctx.T) if t > 0] or [ctx.T // 2]
    return [(t, k % ctx.config.draws) for k, t in enumerate(ts)]


@contextlib.contextmanager
def _grad_on(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, g in zip(params, old):
            p.requires_grad_(g)


def gradient_norms(ctx: ScoreContext, timesteps: Sequence[int] = GSA_TIMESTEPS) -> Tuple[np.ndarray, List[str]]:
    """``(N, L)`` per-module gradient norms of each sample's mean loss over :func:`gsa_pairs`, and the module names.

    The loss of sample ``i`` is ``mean_k mean_d (eps_grad(z_k, t_k) - e_k)^2`` with
    ``z_k = sqrt(abar_t) z0_i + sqrt(1 - abar_t) e_k`` and ``e_k = ctx.noise[m_k]``, computed in
    float64 (``z_k`` is passed to ``eps_grad`` as float64; targets cast it to their dtype).
    """
    target = ctx.target
    pairs = gsa_pairs(ctx, timesteps)

    def compute() -> Tuple[np.ndarray, List[str]]:
        named = dict(target.adapter_parameters())
        if not named:
            raise AuditError("GSA needs LoRA parameters, but target.adapter_parameters() returned none; "
                             "audit a model that carries a LoRA.")
        groups = lora_modules(list(named))
        modules = sorted(groups)
        names = [n for m in modules for n in groups[m]]
        params = [named[n] for n in names]
        owner = np.array([modules.index(n.split(".lora_")[0]) for n in names])
        ts = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        a = ctx.abar[ts].view(-1, *([1] * (ctx.latents.ndim - 1)))  # float64
        e = torch.stack([ctx.noise[m] for _, m in pairs]).double()
        out = np.zeros((ctx.n, len(modules)))
        bar = ctx.bar(ctx.n, "GSA gradients")
        with _grad_on(params):
            for i in range(ctx.n):
                z0 = ctx.latents[i:i + 1].double().expand(len(pairs), *ctx.latents.shape[1:])
                z_t = a.sqrt() * z0 + (1 - a).sqrt() * e
                caps = None if ctx.captions is None else [ctx.captions[i]] * len(pairs)
                cond = ctx.cond(slice(0, len(pairs)), caps)
                pred = target.eps_grad(z_t, ts, cond)
                loss = (pred.double().cpu() - e).pow(2).mean()  # float64, cast back through autograd
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                sq = np.array([0.0 if g is None else float(g.detach().double().pow(2).sum()) for g in grads])
                out[i] = np.sqrt(np.bincount(owner, weights=sq, minlength=len(modules)))
                bar.update(1)
        bar.close()
        ctx.passes["gsa"] = ctx.passes.get("gsa", 0) + ctx.n * len(pairs)
        return out, modules

    return ctx.cached(f"gsa:{tuple(pairs)}", compute)


def cross_fit(X: np.ndarray, cal_index: np.ndarray, cal_labels: np.ndarray, make_model: Callable[[], object],
              seed: int, folds: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Out-of-fold calibration scores and full-fit scores (log-odds, ``(N,)``) of a classifier."""
    from sklearn.model_selection import StratifiedKFold

    folds = max(2, min(folds, int(np.bincount(cal_labels, minlength=2).min())))
    oof = np.zeros(len(cal_index))
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in skf.split(X[cal_index], cal_labels):
        oof[te] = _log_odds(make_model().fit(X[cal_index[tr]], cal_labels[tr]), X[cal_index[te]])
    full = _log_odds(make_model().fit(X[cal_index], cal_labels), X)
    return oof, full, folds


def _log_odds(model, X: np.ndarray) -> np.ndarray:
    p = np.clip(model.predict_proba(X)[:, 1], 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _classifiers(seed: int) -> Dict[str, Callable[[], object]]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        "gboost": lambda: GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                                     random_state=seed),
    }


class GSAAttack(Attack):
    """GSA: classifier on per-LoRA-module gradient norms of the loss (needs the "gradients" capability).

    Options: ``timesteps`` (for T = 1000, default :data:`GSA_TIMESTEPS`). The classifier
    (logistic regression or gradient boosting on log-norms) is chosen by its out-of-fold AUC on
    the calibration split; its out-of-fold scores set the threshold.
    """

    name = "gsa"
    title = "GSA (LoRA per-module gradient norms, classifier)"
    requires = ("gradients",)

    def run(self, ctx, cal_index, cal_labels):
        timesteps = self.options.get("timesteps", GSA_TIMESTEPS)
        norms, modules = gradient_norms(ctx, timesteps)
        X = np.log(norms + 1e-30)
        best = None
        for kind, make in _classifiers(ctx.config.seed).items():
            oof, full, folds = cross_fit(X, cal_index, cal_labels, make, ctx.config.seed, ctx.config.cv_folds)
            a = M.auc(oof[cal_labels == 1], oof[cal_labels == 0])
            if best is None or a > best[0] + 1e-12:
                best = (a, kind, oof, full, folds)
        a, kind, oof, full, folds = best
        scores = full.copy()
        scores[cal_index] = oof  # only out-of-fold scores may set the threshold
        # the norm summed over modules, as a diagnostic curve (small = member)
        total = -np.sqrt((norms ** 2).sum(1))
        return AttackOutput(scores=scores, calibration_index=cal_index,
                            chosen={"classifier": kind, "cv_folds": folds, "lora_modules": len(modules),
                                    "pairs": [list(p) for p in gsa_pairs(ctx, timesteps)],
                                    "calibration_auc": a},
                            curves={"total_gradient_norm": {"-|grad|": total}})


__all__ = ["GSAAttack", "GSA_TIMESTEPS", "cross_fit", "gradient_norms", "gsa_pairs", "lora_modules"]
