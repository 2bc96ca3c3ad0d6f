"""Metrics of one attack on the evaluation split, and the upper envelope over attacks.

Shared by :func:`~.protocol.run_audit` (one run) and :func:`~.pooled.pool_reports` (pooled runs).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import metrics as M
from . import stats as S
from .config import AuditConfig

ENVELOPE_LABEL = ("upper envelope: each metric's maximum over the model-using attacks on the evaluation split; "
                  "selected on that split, so optimistic (see verdict.upper_envelope for its permutation null)")
_ENVELOPE_KEYS = ("auc", "leakage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy")


def attack_metrics(title: str, uses_model: bool, member: np.ndarray, nonmember: np.ndarray,
                   threshold: Optional[float], cfg: AuditConfig) -> Dict[str, Any]:
    """One attack's report entry: AUC with its bootstrap CI, TPR at low FPR, metrics at ``threshold``."""
    ms = M.evaluate(member, nonmember, threshold=threshold, n_boot=cfg.n_boot, seed=cfg.seed)
    return {"title": title, "uses_model": uses_model, **ms.to_dict(),
            "low_fpr": S.low_fpr_summary(member, nonmember, n_boot=cfg.n_boot, seed=cfg.seed)}


def upper_envelope(results: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Each metric's maximum over the model-using attacks' entries (report.json's ``max_over_attacks``)."""
    model = {k: v for k, v in results.items() if v["uses_model"]}
    out: Dict[str, Any] = {"label": ENVELOPE_LABEL}
    for key in _ENVELOPE_KEYS:
        vals = [(v[key], k) for k, v in model.items() if v[key] is not None]
        out[key] = {"value": max(vals)[0], "attack": max(vals)[1]} if vals else None
    for key in ("tpr_at_5pct_fpr", "asr_best_threshold_on_eval"):
        vals = [(v["paper_comparison"][key], k) for k, v in model.items() if v["paper_comparison"][key] is not None]
        out["paper_" + key] = {"value": max(vals)[0], "attack": max(vals)[1]} if vals else None
    if out.get("auc"):
        out["auc"]["ci95"] = model[out["auc"]["attack"]]["auc_ci95"]
    return out
