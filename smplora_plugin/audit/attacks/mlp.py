"""A fresh MLP of the paper's proxy architecture, trained on loss maps (held out from the defense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .. import metrics as M
from ..config import register_options
from ..target import AuditError
from .base import Attack, AttackOutput, _stratified_split


@register_options("mlp", legacy_prefix="mlp_")
@dataclass
class MLPOptions:
    """The MLP's architecture and training; ``fit_fraction`` of the calibration split trains it, the rest
    early-stops it."""

    hidden: Tuple[int, ...] = (512, 256)
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 200
    patience: int = 30
    fit_fraction: float = 0.6

    def validate(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise AuditError("mlp_fit_fraction must be in (0, 1).")


class MLPAttack(Attack):
    """A fresh MLP of the paper's architecture on grid-averaged loss maps.

    Trained on part of the calibration (attack-training) split, early-stopped (checkpoint and
    sign) on the rest of it; the evaluation split is only scored. Inputs are standardised with
    the training part's statistics. Options: :class:`MLPOptions`.
    """

    name = "mlp"
    title = "Trained MLP on loss maps (paper architecture)"
    option_set = "mlp"

    def run(self, ctx, cal_index, cal_labels):
        import torch

        from ...attacker import ProxyAttacker

        opts, seed = self.settings(ctx), ctx.config.seed
        fit_idx, val_idx = _stratified_split(cal_index, cal_labels, opts.fit_fraction, seed)
        lab = np.zeros(ctx.n, dtype=np.int64)
        lab[cal_index] = cal_labels
        x_all = ctx.loss_map()
        mu, sd = x_all[fit_idx].mean(0), x_all[fit_idx].std(0) + 1e-8
        X = torch.as_tensor((x_all - mu) / sd, dtype=torch.float32)
        y = torch.as_tensor(lab)
        model = ProxyAttacker(X.shape[1], hidden=opts.hidden, dropout=opts.dropout, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        gen = torch.Generator().manual_seed(seed + 1)
        fit_t = torch.as_tensor(fit_idx)
        # balanced class weights, so an unbalanced split does not bias the logits
        counts = torch.bincount(y[fit_t], minlength=2).clamp_min(1).float()
        weight = counts.sum() / (2 * counts)
        vcounts = torch.bincount(y[torch.as_tensor(val_idx)], minlength=2).clamp_min(1).float()
        val_weight = vcounts.sum() / (2 * vcounts)
        best = (-float("inf"), -1, None)
        bad = 0
        bs = 64
        for epoch in range(opts.max_epochs):
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
                if bad >= opts.patience:
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
            chosen={"epoch": best[1] + 1, "early_stop_ce": -best[0], "epochs_run": epoch + 1,
                    "input_dim": int(X.shape[1]),
                    "fit_samples": int(len(fit_idx)), "early_stop_samples": int(len(val_idx)),
                    "sign": "as expected" if sign > 0 else "flipped (anti-member direction)",
                    "calibration_auc": max(a, 1 - a)},
        )
