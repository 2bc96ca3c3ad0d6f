"""Pooled evidence over several audited LoRAs (:func:`run_audit_pooled`).

Each run (one trained LoRA with its own member / non-member draw) is audited on its own with
:func:`~.protocol.run_audit`. Then, per attack, every run's scores are standardised with that
run's *calibration non-member* mean and standard deviation (no evaluation label is used),
concatenated, and evaluated as one ROC: AUC with its bootstrap CI, TPR at low FPR, the decision
threshold fixed on the pooled calibration scores. The headline attack is the one with the highest
pooled calibration AUC, and the permutation null permutes labels within each run. The pooled
report holds the verdict over all runs; ``report.runs`` holds each run's own report and verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import metrics as M
from .config import AuditConfig, as_config
from .exposure import attach_exposure
from .protocol import run_audit
from .scoring import attack_metrics, upper_envelope
from .training_dp import pooled_training_dp, read_training_dp
from .types import AuditError, AuditReport, SamplesLike
from .verdict import AttackScores, VerdictSettings, assess


@dataclass
class AuditRun:
    """One audited LoRA: its target and its own member / non-member samples.

    ``calibration_members`` / ``calibration_nonmembers``: explicit calibration sets (both or
    neither; otherwise members and non-members are split with ``calibration_fraction``).
    ``references``: the run's reference models for reference-based attacks, passed through to
    :func:`~.protocol.run_audit` as ``references=`` (``None``: not passed). ``name`` labels the
    run in the report and names its sub-folder; ``info`` / ``utility`` / ``manifest_sets`` are as
    in :func:`~.protocol.run_audit`, and so is ``lora_file``.
    """

    target: Any
    members: SamplesLike
    nonmembers: SamplesLike
    calibration_members: Optional[SamplesLike] = None
    calibration_nonmembers: Optional[SamplesLike] = None
    calibration_fraction: float = 0.5
    references: Any = None
    name: Optional[str] = None
    info: Optional[Mapping[str, Any]] = None
    utility: Optional[Mapping[str, Any]] = None
    manifest_sets: Optional[Mapping[str, Sequence[str]]] = None
    lora_file: Optional[Union[str, Path]] = None  # its smplora.dp header entry is shown (run_audit's lora_file)


def standardise(scores: np.ndarray, cal_scores: np.ndarray, cal_labels: np.ndarray) -> np.ndarray:
    """``(scores - mu) / sd`` with the mean and std of the calibration non-members' scores."""
    ref = np.asarray(cal_scores, dtype=np.float64)[np.asarray(cal_labels) == 0]
    if ref.size == 0:
        raise AuditError("a run has no calibration non-member scores to standardise with.")
    mu, sd = float(ref.mean()), float(ref.std())
    if not np.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(mu)):
        sd = 1.0  # constant calibration scores: centre only
    return (np.asarray(scores, dtype=np.float64) - mu) / sd


def pool_scores(runs: Sequence[Mapping[str, AttackScores]], attacks: Sequence[str]) -> Dict[str, AttackScores]:
    """Per attack, every run's scores standardised with its calibration non-members (:func:`standardise`), then
    concatenated in run order (evaluation and calibration alike)."""
    pooled: Dict[str, AttackScores] = {}
    for a in attacks:
        ev, cal, cal_lab = [], [], []
        for scores in runs:
            sc = scores[a]
            ev.append(standardise(sc.eval_scores, sc.cal_scores, sc.cal_labels))
            cal.append(standardise(sc.cal_scores, sc.cal_scores, sc.cal_labels))
            cal_lab.append(sc.cal_labels)
        pooled[a] = AttackScores(np.concatenate(ev), np.concatenate(cal), np.concatenate(cal_lab),
                                 uses_model=runs[0][a].uses_model)
    return pooled


def run_audit_pooled(
    runs: Sequence[AuditRun],
    *,
    attacks: Optional[Sequence[Any]] = None,
    config: Optional[Union[AuditConfig, Mapping[str, Any]]] = None,
    out_dir: Optional[Union[str, Path]] = None,
    title: str = "Membership-inference audit (pooled over runs)",
    progress: bool = True,
    load_plugins: bool = True,
    num_threads: Optional[int] = None,
    n_permutations: int = 1000,
) -> AuditReport:
    """Audit several LoRAs and pool the evidence (see the module docstring).

    Every run uses the same ``attacks``, ``config`` (one seed: the same noise draws) and settings.
    With ``out_dir``: the pooled ``report.json``, ``report.md``, ``roc.png`` at the top, and each
    run's full report (``report.json``, ``report.md``, ``roc.png``, ``per_timestep_auc.png``,
    ``manifest.json``) in ``run_01_<name>/``, ``run_02_<name>/``, ...
    """
    runs = list(runs)
    if not runs:
        raise AuditError("run_audit_pooled needs at least one AuditRun.")
    for i, r in enumerate(runs):
        if not isinstance(r, AuditRun):
            raise AuditError(f"runs[{i}] is a {type(r).__name__}; give AuditRun(target, members, nonmembers, ...).")
    names = [r.name or f"run {i + 1}" for i, r in enumerate(runs)]
    if len(set(names)) != len(names):
        raise AuditError(f"run names must be unique, got {names}.")
    cfg = as_config(config)
    vset = VerdictSettings(n_permutations=int(n_permutations))
    vset.validate()
    for r in runs:  # every header checked before any run is scored
        if r.lora_file is not None:
            read_training_dp(r.lora_file)
    t0 = time.time()
    reports: List[AuditReport] = []
    for name, r in zip(names, runs):
        reports.append(run_audit(
            r.target, r.members, r.nonmembers, calibration_members=r.calibration_members,
            calibration_nonmembers=r.calibration_nonmembers, calibration_fraction=r.calibration_fraction,
            attacks=attacks, config=cfg, out_dir=None, utility=r.utility, manifest_sets=r.manifest_sets,
            info={"run": name, **dict(r.info or {})}, title=f"{title}: {name}", progress=progress,
            load_plugins=load_plugins, num_threads=num_threads, n_permutations=n_permutations, references=r.references,
            lora_file=r.lora_file))
    report = pool_reports(reports, names, config=cfg, title=title, settings=vset)
    attach_exposure(report)  # ranked per run (each run's report has its own ranking and exposure.png)
    report.training_dp = pooled_training_dp([r.training_dp for r in reports], names)
    report.seconds = round(time.time() - t0, 2)
    if out_dir is not None:
        report.write(out_dir)
    return report


def pool_reports(reports: Sequence[AuditReport], names: Sequence[str], *, config: AuditConfig, title: str,
                 settings: Optional[VerdictSettings] = None) -> AuditReport:
    """The pooled :class:`AuditReport` of already-scored single-run reports (attacks common to all runs)."""
    if any(r.scores is None or r.eval_labels is None for r in reports):
        raise AuditError("pooling needs reports returned by run_audit in this session (their scores are not "
                         "saved in report.json).")
    common = [a for a in reports[0].scores if all(a in r.scores for r in reports)]
    if not common:
        raise AuditError("the runs share no attack; run the same attacks on every run.")
    labels = np.concatenate([r.eval_labels for r in reports]).astype(int)
    strata = np.concatenate([np.full(r.eval_labels.size, i) for i, r in enumerate(reports)])
    pooled = pool_scores([r.scores for r in reports], common)
    results: Dict[str, Dict[str, Any]] = {}
    roc: Dict[str, Tuple[List[float], List[float]]] = {}
    for a in common:
        ps = pooled[a]
        cm, cn = ps.cal_scores[ps.cal_labels == 1], ps.cal_scores[ps.cal_labels == 0]
        thr, cal_bacc = M.best_threshold(cm, cn)
        em, en = ps.eval_scores[labels == 1], ps.eval_scores[labels == 0]
        d = attack_metrics(reports[0].attacks[a]["title"], ps.uses_model, em, en, thr, config)
        d["calibration"] = {"calibration_auc": ps.calibration_auc, "balanced_accuracy": cal_bacc,
                            "per_run_auc": [r.attacks[a]["auc"] for r in reports]}
        d["seconds"] = round(sum(r.attacks[a].get("seconds", 0.0) for r in reports), 2)
        results[a] = d
        fpr, tpr, _ = M.roc_curve(em, en)
        roc[a] = (fpr.tolist(), tpr.tolist())
    verdict = assess(pooled, labels, results, seed=config.seed, strata=strata, settings=settings)
    per_run = []
    for n, r in zip(names, reports):
        v = r.verdict or {}
        h = v.get("headline") or {}
        per_run.append({"run": n, "verdict": v.get("verdict"), "headline": h.get("attack"),
                        "headline_auc": h.get("auc"),
                        "headline_p_value": h.get("p_value")})
    verdict["per_run"] = per_run
    splits: Dict[str, int] = {}
    for r in reports:
        for k, v in r.splits.items():
            splits[k] = splits.get(k, 0) + v
    passes: Dict[str, int] = {}
    for r in reports:
        for k, v in r.passes.items():
            passes[k] = passes.get(k, 0) + v
    n1, n0 = int(labels.sum()), int((labels == 0).sum())
    return AuditReport(
        title=title, verdict=verdict, attacks=results, max_over_attacks=upper_envelope(results), utility={},
        splits=splits, null_band=M.null_band(n1, n0), config=config.to_dict(), timesteps=reports[0].timesteps,
        passes=passes, info={"runs": list(names)}, seconds=round(sum(r.seconds for r in reports), 2), manifest=None,
        roc=roc, scores=pooled, eval_labels=labels, runs=list(reports),
        pooling={"n_runs": len(reports), "runs": list(names), "attacks": common,
                 "method": "per run, each attack's scores are standardised with that run's calibration non-member "
                           "mean and std (no evaluation labels), then concatenated; the threshold is fixed on the "
                           "pooled calibration scores; label permutations are stratified within runs"},
    )
