"""Membership-inference attacks with one interface, and their registry.

An attack turns the cached model quantities of a :class:`~.engine.ScoreContext` into one score
per sample, higher = more likely a member. Threshold attacks return named *candidates*
(e.g. one per timestep); the protocol picks the candidate and the sign on the calibration split
only. Trained attacks override :meth:`Attack.run` and fit on the calibration split, returning
held-out calibration scores for the threshold.

Third-party attacks: subclass :class:`Attack`, then call :func:`register_attack`, or implement
the ``smplora_register_attacks(register)`` hook in an ``smplora`` entry-point plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Type

import numpy as np

from . import metrics as M
from .engine import ScoreContext
from .target import AuditError


@dataclass
class AttackOutput:
    """Scores of one attack for all ``N`` samples, oriented so that higher = member.

    ``calibration_index``: the calibration samples whose scores were not fitted on and may fix
    the threshold. ``chosen``: what was tuned on the calibration split (candidate, sign, epoch,
    ...). ``curves``: optional named families of candidates (e.g. per-timestep) for diagnostics.
    """

    scores: np.ndarray
    calibration_index: np.ndarray
    chosen: Dict[str, Any] = field(default_factory=dict)
    curves: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)


class Attack:
    """Base class. Subclasses set ``name``/``title`` and implement :meth:`candidates` or :meth:`run`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_captions: ClassVar[bool] = False
    uses_model: ClassVar[bool] = True  # False only for the blind baseline

    def __init__(self, **options: Any):
        self.options = options

    def candidates(self, ctx: ScoreContext) -> Dict[str, np.ndarray]:
        """Named candidate scores ``(N,)``, oriented by the attack's prior (higher = member)."""
        raise NotImplementedError

    def curves(self, ctx: ScoreContext) -> Dict[str, Dict[str, np.ndarray]]:
        """Optional diagnostic families of scores (name -> {label: scores})."""
        return {}

    def run(self, ctx: ScoreContext, cal_index: np.ndarray, cal_labels: np.ndarray) -> AttackOutput:
        """Pick the candidate and sign with the largest two-sided AUC on the calibration split."""
        cands = self.candidates(ctx)
        if not cands:
            raise AuditError(f"attack {self.name!r} produced no scores.")
        best_name, best_auc = None, None
        for name, s in cands.items():
            a = M.auc(s[cal_index][cal_labels == 1], s[cal_index][cal_labels == 0])
            if best_auc is None or abs(a - 0.5) > abs(best_auc - 0.5) + 1e-12:
                best_name, best_auc = name, a
        sign = 1.0 if best_auc >= 0.5 else -1.0
        chosen = {"sign": "as expected" if sign > 0 else "flipped (anti-member direction)",
                  "calibration_auc": best_auc if sign > 0 else 1.0 - best_auc}
        if len(cands) > 1:
            chosen["candidate"] = best_name
        return AttackOutput(scores=sign * cands[best_name], calibration_index=cal_index, chosen=chosen,
                            curves=self.curves(ctx))


# --------------------------------------------------------------------------------------------
# 1. loss family

def _per_t(ctx: ScoreContext, grid: np.ndarray, sign: float = -1.0) -> Dict[str, np.ndarray]:
    return {f"t={t}": sign * grid[:, k, :].mean(1) for k, t in enumerate(ctx.timesteps)}


class LossAttack(Attack):
    """Denoising loss averaged over the timestep grid and the noise draws (low = member)."""

    name = "loss"
    title = "Loss (t-grid x noise draws)"

    def candidates(self, ctx):
        return {"mean": -ctx.loss_grid(True).mean((1, 2))}

    def curves(self, ctx):
        return {"per_timestep": _per_t(ctx, ctx.loss_grid(True))}


class CalibratedLossAttack(Attack):
    """Loss minus the base model's loss at the same draws (difficulty calibration; low = member)."""

    name = "loss_calibrated"
    title = "Loss - base loss (calibrated)"

    def _delta(self, ctx):
        return ctx.loss_grid(True) - ctx.loss_grid(False)

    def candidates(self, ctx):
        return {"mean": -self._delta(ctx).mean((1, 2))}

    def curves(self, ctx):
        return {"per_timestep": _per_t(ctx, self._delta(ctx))}


class BestTimestepLossAttack(Attack):
    """Single-timestep loss or calibrated loss; the timestep and variant are chosen on calibration."""

    name = "loss_best_t"
    title = "Loss at best t (chosen on calibration)"

    def candidates(self, ctx):
        raw = {f"loss {k}": v for k, v in _per_t(ctx, ctx.loss_grid(True)).items()}
        cal = {f"calibrated {k}": v for k, v in _per_t(ctx, ctx.loss_grid(True) - ctx.loss_grid(False)).items()}
        return {**raw, **cal}


class SimAAttack(Attack):
    """SimA: squared norm of the noise prediction on the clean latent at small t (low = member)."""

    name = "sima"
    title = "SimA (norm of eps(z0, t), t on calibration)"

    def candidates(self, ctx):
        s = ctx.sima(True)
        return {f"t={t}": -s[:, j] for j, t in enumerate(ctx.sima_timesteps)}


# --------------------------------------------------------------------------------------------
# 2. SecMI and PIA

class SecMIAttack(Attack):
    """SecMI_stat: t-error after deterministic DDIM inversion (t_sec 100, step 10; low = member)."""

    name = "secmi"
    title = "SecMI (t-error, t_sec 100, k 10)"

    def candidates(self, ctx):
        return {"t_sec": -ctx.secmi(True)}


class PIAAttack(Attack):
    """PIA: proximal initialisation with the model's own eps(z0, 0), p = 4; t chosen on calibration."""

    name = "pia"
    title = "PIA (p = 4, t on calibration)"

    def candidates(self, ctx):
        s = ctx.pia(True)
        return {f"t={t}": -s[:, j] for j, t in enumerate(ctx.pia_timesteps)}


# --------------------------------------------------------------------------------------------
# 3. trained attackers (held out from the defense)

class MLPAttack(Attack):
    """A fresh MLP of the paper's architecture on grid-averaged loss maps.

    Trained on part of the calibration (attack-training) split, early-stopped (checkpoint and
    sign) on the rest of it; the evaluation split is only scored. Inputs are standardised with
    the training part's statistics.
    """

    name = "mlp"
    title = "Trained MLP on loss maps (paper architecture)"

    def run(self, ctx, cal_index, cal_labels):
        import torch

        from ..attacker import ProxyAttacker

        cfg = ctx.config
        fit_idx, val_idx = _stratified_split(cal_index, cal_labels, cfg.mlp_fit_fraction, cfg.seed)
        lab = np.zeros(ctx.n, dtype=np.int64)
        lab[cal_index] = cal_labels
        x_all = ctx.loss_map()
        mu, sd = x_all[fit_idx].mean(0), x_all[fit_idx].std(0) + 1e-8
        X = torch.as_tensor((x_all - mu) / sd, dtype=torch.float32)
        y = torch.as_tensor(lab)
        model = ProxyAttacker(X.shape[1], hidden=cfg.mlp_hidden, dropout=cfg.mlp_dropout, seed=cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.mlp_lr, weight_decay=cfg.mlp_weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        fit_t = torch.as_tensor(fit_idx)
        # balanced class weights, so an unbalanced split does not bias the logits
        counts = torch.bincount(y[fit_t], minlength=2).clamp_min(1).float()
        weight = counts.sum() / (2 * counts)
        vcounts = torch.bincount(y[torch.as_tensor(val_idx)], minlength=2).clamp_min(1).float()
        val_weight = vcounts.sum() / (2 * vcounts)
        best = (-float("inf"), -1, None)
        bad = 0
        bs = 64
        for epoch in range(cfg.mlp_max_epochs):
            model.train()
            perm = fit_t[torch.randperm(fit_t.numel(), generator=gen)]
            for i in range(0, perm.numel(), bs):
                b = perm[i:i + bs]
                loss = torch.nn.functional.cross_entropy(model(X[b], generator=gen), y[b], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():  # balanced validation cross-entropy picks the checkpoint
                vi = torch.as_tensor(val_idx)
                score = -float(torch.nn.functional.cross_entropy(model(X[vi]), y[vi], weight=val_weight))
            if score > best[0] + 1e-6:
                best = (score, epoch, {k: v.clone() for k, v in model.state_dict().items()})
                bad = 0
            else:
                bad += 1
                if bad >= cfg.mlp_patience:
                    break
        model.load_state_dict(best[2])
        model.eval()
        with torch.no_grad():
            lp = torch.log_softmax(model(X), 1)
            scores = (lp[:, 1] - lp[:, 0]).double().numpy()
        vl = lab[val_idx]
        a = M.auc(scores[val_idx][vl == 1], scores[val_idx][vl == 0])
        sign = 1.0 if a >= 0.5 else -1.0
        return AttackOutput(
            scores=sign * scores, calibration_index=val_idx,
            chosen={"epoch": best[1] + 1, "early_stop_ce": -best[0], "epochs_run": epoch + 1, "input_dim": int(X.shape[1]),
                    "fit_samples": int(len(fit_idx)), "early_stop_samples": int(len(val_idx)),
                    "sign": "as expected" if sign > 0 else "flipped (anti-member direction)",
                    "calibration_auc": max(a, 1 - a)},
        )


def scalar_features(ctx: ScoreContext) -> Dict[str, np.ndarray]:
    """The vector of scalar scores for the stacked attackers: name -> ``(N,)``."""
    g, gb = ctx.loss_grid(True), ctx.loss_grid(False)
    feats: Dict[str, np.ndarray] = {"loss": g.mean((1, 2)), "loss_calibrated": (g - gb).mean((1, 2))}
    for k, t in enumerate(ctx.timesteps):
        feats[f"loss t={t}"] = g[:, k].mean(1)
        feats[f"calibrated t={t}"] = (g - gb)[:, k].mean(1)
    for j, t in enumerate(ctx.sima_timesteps):
        feats[f"sima t={t}"] = ctx.sima(True)[:, j]
    for j, t in enumerate(ctx.pia_timesteps):
        feats[f"pia t={t}"] = np.log(ctx.pia(True)[:, j] + 1e-20)
    feats["secmi"] = np.log(ctx.secmi(True) + 1e-20)
    if ctx.captions is not None:
        cond, red = ctx.clid()
        for i in range(red.shape[1]):
            feats[f"clid D{i + 1}"] = (red[:, i] - cond).mean(1)
    return feats


class _CrossFitted(Attack):
    """Fit a scikit-learn classifier on the calibration split with out-of-fold calibration scores."""

    def features(self, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError

    def make_model(self, seed: int):
        raise NotImplementedError

    def run(self, ctx, cal_index, cal_labels):
        from sklearn.model_selection import StratifiedKFold

        X = self.features(ctx)
        folds = max(2, min(ctx.config.cv_folds, int(np.bincount(cal_labels, minlength=2).min())))
        oof = np.zeros(len(cal_index))
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=ctx.config.seed)
        for tr, te in skf.split(X[cal_index], cal_labels):
            model = self.make_model(ctx.config.seed).fit(X[cal_index[tr]], cal_labels[tr])
            oof[te] = _member_score(model, X[cal_index[te]])
        model = self.make_model(ctx.config.seed).fit(X[cal_index], cal_labels)
        scores = _member_score(model, X)
        scores[cal_index] = oof  # only out-of-fold scores may set the threshold
        a = M.auc(oof[cal_labels == 1], oof[cal_labels == 0])
        return AttackOutput(scores=scores, calibration_index=cal_index,
                            chosen={"cv_folds": folds, "features": int(X.shape[1]), "calibration_auc_oof": a})


def _member_score(model, X: np.ndarray) -> np.ndarray:
    p = model.predict_proba(X)[:, 1]
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class LogRegAttack(_CrossFitted):
    """Logistic regression on the standardised vector of scalar scores (loss, calibrated, SimA, PIA, SecMI, CLiD)."""

    name = "logreg"
    title = "Logistic regression on scalar scores"

    def features(self, ctx):
        return np.stack(list(scalar_features(ctx).values()), 1)

    def make_model(self, seed):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


class GradientBoostingAttack(LogRegAttack):
    """Gradient-boosted trees on the vector of scalar scores."""

    name = "gboost"
    title = "Gradient boosting on scalar scores"

    def make_model(self, seed):
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                          random_state=seed)


# --------------------------------------------------------------------------------------------
# 4. CLiD

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


def _pick(cands: Dict[str, np.ndarray], cal_index: np.ndarray, cal_labels: np.ndarray) -> AttackOutput:
    class _Tmp(Attack):
        name = "tmp"

        def candidates(self, ctx):
            return cands

    return _Tmp().run(None, cal_index, cal_labels)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# blind baseline

class BlindBaseline(_CrossFitted):
    """No model access: logistic regression on downsampled pixels (and caption words).

    It must sit at chance; anything else means members and non-members differ in distribution
    (split bias), and every attack's numbers are inflated by it.
    """

    name = "blind"
    title = "Blind baseline (pixels/captions, no model)"
    uses_model = False

    def features(self, ctx):
        X = ctx.pixels()
        if ctx.captions is not None:
            from sklearn.feature_extraction.text import HashingVectorizer

            words = HashingVectorizer(n_features=256, alternate_sign=False).transform(ctx.captions).toarray()
            X = np.concatenate([X, words], 1)
        return X

    def make_model(self, seed):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def _stratified_split(index: np.ndarray, labels: np.ndarray, frac: float, seed: int):
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in (0, 1):
        idx = index[labels == c]
        idx = idx[rng.permutation(idx.size)]
        k = int(round(frac * idx.size))
        k = min(max(k, 1), idx.size - 1) if idx.size >= 2 else idx.size
        fit.append(idx[:k])
        val.append(idx[k:])
    fit_idx, val_idx = np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))
    if min(np.isin(val_idx, index[labels == 1]).sum(), np.isin(val_idx, index[labels == 0]).sum()) < 1:
        raise AuditError("the MLP attack needs at least 2 members and 2 non-members in the calibration split.")
    return fit_idx, val_idx


# --------------------------------------------------------------------------------------------
# registry

BUILTIN_ATTACKS: Dict[str, Type[Attack]] = {
    cls.name: cls
    for cls in (LossAttack, CalibratedLossAttack, BestTimestepLossAttack, SimAAttack, SecMIAttack, PIAAttack,
                CLiDAttack, MLPAttack, LogRegAttack, GradientBoostingAttack, BlindBaseline)
}
_EXTRA: Dict[str, Type[Attack]] = {}

DEFAULT_ATTACKS = ("loss", "loss_calibrated", "loss_best_t", "sima", "secmi", "pia", "clid", "mlp", "logreg",
                   "gboost", "blind")


def register_attack(name: str, cls: Type[Attack]) -> None:
    """Register ``cls`` (a subclass of :class:`Attack`) under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise AuditError(f"attack {name!r} must be a subclass of smplora_plugin.audit.attacks.Attack, got {cls!r}.")
    if not name or name in BUILTIN_ATTACKS:
        raise AuditError(f"attack name {name!r} is empty or taken by a built-in attack.")
    if not getattr(cls, "name", ""):
        cls.name = name
    elif cls.name != name:
        raise AuditError(f"attack class {cls.__name__} is named {cls.name!r} but registered as {name!r}.")
    _EXTRA[name] = cls


def available_attacks(load_plugins: bool = True, plugins: Optional[List[object]] = None) -> Dict[str, Type[Attack]]:
    """Built-in attacks plus registered ones, plus those of ``smplora_register_attacks`` plugins.

    Plugins are the installed ``smplora`` entry points (unless ``SMPLORA_DISABLE_PLUGINS``), or
    the explicit ``plugins`` list when given.
    """
    if load_plugins or plugins is not None:
        from ..plugins import make_plugin_manager

        make_plugin_manager(plugins).hook.smplora_register_attacks(register=register_attack)
    return {**BUILTIN_ATTACKS, **_EXTRA}


def resolve_attacks(attacks: Optional[List[Any]], has_captions: bool, load_plugins: bool = True) -> List[Attack]:
    """Turn names / classes / instances into attack instances; ``None`` = the default suite."""
    registry = available_attacks(load_plugins) if attacks is None or any(isinstance(a, str) for a in attacks) \
        else dict(BUILTIN_ATTACKS)
    chosen = list(DEFAULT_ATTACKS) + sorted(_EXTRA) if attacks is None else list(attacks)
    out: List[Attack] = []
    for a in chosen:
        if isinstance(a, str):
            if a not in registry:
                raise AuditError(f"unknown attack {a!r}; available: {', '.join(sorted(registry))}.")
            inst = registry[a]()
        elif isinstance(a, type) and issubclass(a, Attack):
            inst = a()
        elif isinstance(a, Attack):
            inst = a
        else:
            raise AuditError(f"{a!r} is not an attack name, Attack subclass or Attack instance.")
        if inst.needs_captions and not has_captions:
            if attacks is None:
                continue  # CLiD is skipped silently in the default suite when there are no captions
            raise AuditError(f"attack {inst.name!r} needs captions; give captions or drop it.")
        out.append(inst)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise AuditError(f"attack names must be unique, got {names}.")
    return out
