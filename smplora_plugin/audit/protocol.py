"""The audit protocol: splits, calibration, metrics per attack and over attacks, utility.

:func:`run_audit` is the entry point used by ``smplora audit`` and ``smplora demo``. It runs three
named steps: ``_plan`` settles and checks everything before any model work, ``_score_attacks``
scores the attacks on one shared :class:`~.engine.ScoreContext` (inside
:func:`~.engine.cpu_settings`), and ``_assemble`` builds the :class:`~.types.AuditReport`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..holdout import split_by_identity
from . import metrics as M
from .attacks import Attack, AttackOutput, resolve_attacks
from .attacks.generation import kept_nearest
from .attacks.registry import suite_name
from .config import AuditConfig, as_config
from .engine import ScoreContext, cpu_settings
from .exposure import attach_exposure
from .progress import warn
from .references import ReferenceView, check_compatible, match, select_attacks
from .report import run_folder
from .scoring import ENVELOPE_LABEL, attack_metrics, upper_envelope
from .target import check_target
from .training_dp import read_training_dp
from .types import AuditError, AuditReport, AuditSamples, SamplesLike, as_samples
from .verdict import AttackScores, VerdictSettings, assess

__all__ = ["ENVELOPE_LABEL", "MIN_PER_SIDE", "AuditReport", "AuditSamples", "SamplesLike", "as_samples",
           "check_pixel_overlap", "run_audit", "run_folder", "split_calibration"]

MIN_PER_SIDE = 4  # fewer members or non-members in a split and no metric means anything
ORDER = ("member_calibration", "nonmember_calibration", "member_eval", "nonmember_eval")  # the context's sample order


def run_audit(
    target: Any,
    members: SamplesLike,
    nonmembers: SamplesLike,
    *,
    calibration_members: Optional[SamplesLike] = None,
    calibration_nonmembers: Optional[SamplesLike] = None,
    calibration_fraction: float = 0.5,
    attacks: Union[None, str, Sequence[Any]] = None,
    config: Optional[Union[AuditConfig, Mapping[str, Any]]] = None,
    out_dir: Optional[Union[str, Path]] = None,
    utility: Optional[Mapping[str, Any]] = None,
    manifest_sets: Optional[Mapping[str, Sequence[str]]] = None,
    info: Optional[Mapping[str, Any]] = None,
    title: str = "Membership-inference audit",
    progress: bool = True,
    load_plugins: bool = True,
    num_threads: Optional[int] = None,
    n_permutations: int = 1000,
    references: Optional[Any] = None,
    lora_file: Optional[Union[str, Path]] = None,
) -> AuditReport:
    """Audit ``target`` (an :class:`~.target.AuditTarget`) on member / non-member samples.

    Without ``calibration_members``/``calibration_nonmembers``, ``members`` and ``nonmembers``
    are each split by identity into a calibration (attack-training) part and an evaluation part
    (``calibration_fraction``, seeded by ``config.seed``). Everything tuned (candidate timestep,
    sign, threshold, MLP checkpoint, classifier) uses the calibration part only; metrics use the
    evaluation part only. ``attacks``: names, classes or instances, or a suite's name (default: the
    whole suite; ``"fast"``: :data:`~.attacks.FAST_ATTACKS`; CLiD only when captions exist).
    ``utility``: extra utility fields shown in the report (e.g. ratio to plain LoRA, sample quality).
    ``manifest_sets``: extra named id lists (e.g. the defense's ``member_defense`` /
    ``nonmember_defense``) recorded in, and checked for overlap by, the manifest. ``info``: free-form
    run facts (steps per image, model, ...) for the report.
    With ``out_dir``, writes ``report.json``, ``report.md``, ``roc.png``, ``per_timestep_auc.png``
    and ``manifest.json``. ``num_threads``: torch CPU threads during the audit (restored
    afterwards); ``None`` means 1, which is fastest on a busy machine, where spinning OpenMP threads
    fight for cores. ``n_permutations``: label permutations behind the verdict's p-values (>= 1000).
    The report's ``verdict`` block holds the calibrated headline, the upper envelope with its
    permutation null, power, sample sizes needed, warnings and the empirical epsilon lower bound
    (see :mod:`.verdict`). Several LoRAs: :func:`run_audit_pooled`. ``references``: reference models
    (:class:`~.references.References`) for LiRA / RMIA, which then join the default suite.
    ``lora_file``: the audited LoRA's ``.safetensors`` file; when its header has a ``smplora.dp`` entry (trained
    with DP noise), the report's ``training_dp`` block shows that formal epsilon beside the empirical lower bound
    (:mod:`.training_dp`).
    """
    training_dp = None if lora_file is None else read_training_dp(lora_file)  # a bad entry fails before any work
    plan = _plan(target, members, nonmembers, calibration_members=calibration_members,
                 calibration_nonmembers=calibration_nonmembers, calibration_fraction=calibration_fraction,
                 attacks=attacks, config=config, manifest_sets=manifest_sets, load_plugins=load_plugins,
                 num_threads=num_threads, n_permutations=n_permutations, references=references)
    t0 = time.time()
    with cpu_settings(plan.threads):
        ctx = plan.context(target, progress)
        scored = _score_attacks(ctx, plan)
    report = _assemble(plan, ctx, scored, title=title, utility=utility, info=info, t0=t0)
    report.training_dp = training_dp
    if out_dir is not None:
        report.write(out_dir)
    return report


@dataclass
class _Plan:
    """Everything :func:`run_audit` settles before any model work (made by ``_plan``)."""

    config: AuditConfig
    verdict_settings: VerdictSettings
    threads: int
    parts: Dict[str, AuditSamples]  # in ORDER
    has_captions: bool
    attacks: List[Attack]
    skipped: Dict[str, str]  # default-suite attacks left out, and why
    sets: Dict[str, List[str]]  # the manifest's sets
    manifest_extra: Dict[str, Any]
    warnings: List[str]
    references: Optional[ReferenceView]
    labels: np.ndarray = field(init=False)  # 1 = member, in ORDER
    cal_index: np.ndarray = field(init=False)
    eval_index: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        sizes = [len(self.parts[k]) for k in ORDER]
        bounds = np.cumsum([0] + sizes)
        self.labels = np.concatenate([np.full(s, 1 if k.startswith("member") else 0) for k, s in zip(ORDER, sizes)])
        self.cal_index = np.arange(bounds[0], bounds[2])
        self.eval_index = np.arange(bounds[2], bounds[4])

    def context(self, target: Any, progress: bool) -> ScoreContext:
        """The score context of all samples, in :data:`ORDER`."""
        allp = AuditSamples.concat([self.parts[k] for k in ORDER])
        ctx = ScoreContext(target, allp.images, allp.captions if self.has_captions else None, self.config,
                           progress=progress)
        ctx.references = self.references
        return ctx


def _plan(target: Any, members: SamplesLike, nonmembers: SamplesLike, *,
          calibration_members: Optional[SamplesLike], calibration_nonmembers: Optional[SamplesLike],
          calibration_fraction: float, attacks: Optional[Sequence[Any]],
          config: Optional[Union[AuditConfig, Mapping[str, Any]]], manifest_sets: Optional[Mapping[str, Sequence[str]]],
          load_plugins: bool, num_threads: Optional[int], n_permutations: int, references: Optional[Any]) -> _Plan:
    """Check every input and settle splits, attacks and manifest sets; raises :class:`AuditError` first.

    Near-duplicate warnings go to stderr (:func:`~.progress.warn`) and into the plan.
    """
    check_target(target)
    cfg = as_config(config)
    vset = VerdictSettings(n_permutations=int(n_permutations))
    vset.validate()
    threads = _threads(num_threads)
    parts = _splits(members, nonmembers, calibration_members, calibration_nonmembers, calibration_fraction, cfg.seed)
    has_caps = all(p.captions is not None for p in parts.values())
    skipped: Dict[str, str] = {}
    suite = suite_name(attacks)
    chosen = resolve_attacks(suite if suite is not None else list(attacks), has_caps, load_plugins,
                             target=target, skipped=skipped)
    sets = _manifest_sets(parts, manifest_sets)
    warnings = check_pixel_overlap(parts, cfg.near_duplicate_mse)
    for w in warnings:
        warn(w)
    ref_view = None
    if references is not None:  # matched in the order of the score context
        ref_view = match(references, AuditSamples.concat([parts[k] for k in ORDER]))
        check_compatible(ref_view, target, parts["member_calibration"].images)
    chosen = select_attacks(chosen, suite is not None, ref_view)
    extra = {"calibration_fraction": calibration_fraction if calibration_members is None else None}
    return _Plan(cfg, vset, threads, parts, has_caps, chosen, skipped, sets, extra, warnings, ref_view)


def _threads(num_threads: Optional[int]) -> int:
    threads = 1 if num_threads is None else num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise AuditError(f"num_threads={num_threads!r} must be a whole number >= 1 (or None for 1).")
    return threads


def _splits(members: SamplesLike, nonmembers: SamplesLike, calibration_members: Optional[SamplesLike],
            calibration_nonmembers: Optional[SamplesLike], fraction: float, seed: int) -> Dict[str, AuditSamples]:
    """The four splits in :data:`ORDER`, each with at least :data:`MIN_PER_SIDE` samples of one shape."""
    mem, non = as_samples(members, "members"), as_samples(nonmembers, "nonmembers")
    if (calibration_members is None) != (calibration_nonmembers is None):
        raise AuditError("give both calibration_members and calibration_nonmembers, or neither.")
    if calibration_members is None:
        m_cal, m_ev = split_calibration(mem, fraction, seed, "member")
        n_cal, n_ev = split_calibration(non, fraction, seed + 1, "non-member")
    else:
        m_cal = as_samples(calibration_members, "calibration_members")
        n_cal = as_samples(calibration_nonmembers, "calibration_nonmembers")
        m_ev, n_ev = mem, non
    parts = dict(zip(ORDER, (m_cal, n_cal, m_ev, n_ev)))
    for name, p in parts.items():
        if len(p) < MIN_PER_SIDE:
            raise AuditError(f"the {name} split has {len(p)} samples; at least {MIN_PER_SIDE} are needed "
                             "(give more images or change calibration_fraction).")
    shapes = {tuple(p.images.shape[1:]) for p in parts.values()}
    if len(shapes) != 1:
        raise AuditError(f"all images must have the same shape, got {sorted(shapes)}; resize them first.")
    return parts


def split_calibration(samples: AuditSamples, fraction: float, seed: int,
                      what: str) -> Tuple[AuditSamples, AuditSamples]:
    """Split by identity into (calibration, evaluation) with the core's holdout helper."""
    ids = samples.identity()
    uniq = sorted(set(ids))
    n_cal = int(round(fraction * len(uniq)))
    if n_cal < 1 or n_cal >= len(uniq):
        raise AuditError(f"cannot split {len(uniq)} {what} identities with calibration_fraction={fraction}.")
    parts = split_by_identity(uniq, {"calibration": n_cal, "eval": len(uniq) - n_cal}, seed=seed)
    by_id: Dict[str, List[int]] = {}
    for i, s in enumerate(ids):
        by_id.setdefault(s, []).append(i)
    cal = sorted(i for s in parts["calibration"] for i in by_id[s])
    ev = sorted(i for s in parts["eval"] for i in by_id[s])
    return samples.subset(cal), samples.subset(ev)


def _manifest_sets(parts: Mapping[str, AuditSamples],
                   extra: Optional[Mapping[str, Sequence[str]]]) -> Dict[str, List[str]]:
    """The manifest's sets: the four splits' identities and ``extra``; no sample may sit in two."""
    sets = {name: p.identity() for name, p in parts.items()}
    for name, ids in (extra or {}).items():
        if name in sets:
            raise AuditError(f"manifest set name {name!r} is reserved; choose another name.")
        sets[name] = [str(i) for i in ids]
    seen: Dict[str, str] = {}
    for name, ids in sets.items():
        for i in set(ids):
            if i in seen and seen[i] != name:
                raise AuditError(f"sample {i!r} is in both {seen[i]!r} and {name!r}: members, non-members and the "
                                 "defense's sets must be disjoint. Remove the duplicate from one of them.")
            seen[i] = name
    return sets


def check_pixel_overlap(parts: Mapping[str, AuditSamples], near_mse: float = 1e-3, max_listed: int = 5) -> List[str]:
    """Refuse identical pixels in two sets (whatever their ids); return warnings for near-duplicates.

    A near-duplicate pair is two images of different sets whose mean squared difference, after
    pooling each to at most 16 x 16 per channel (pixel range [-1, 1]), is below ``near_mse``
    (``AuditConfig.near_duplicate_mse``; 0 turns the check off). Raises :class:`AuditError`
    naming both samples before any model work.
    """
    seen: Dict[str, Tuple[str, str]] = {}
    for name, p in parts.items():
        for h, ident in zip(p.pixel_hashes(), p.identity()):
            if h in seen and seen[h][0] != name:
                other_set, other_id = seen[h]
                raise AuditError(
                    f"sample {ident!r} in {name!r} has the same pixels as {other_id!r} in {other_set!r}: members, "
                    "non-members and their calibration splits must not share images. Remove one copy (or, for "
                    "copies within one side, give them the same id so that they stay in one split).")
            seen.setdefault(h, (name, ident))
    if near_mse <= 0:
        return []
    pooled = {}
    for name, p in parts.items():
        x = p.images.detach().double().cpu()
        if x.ndim == 4 and max(x.shape[-2:]) > 16:
            x = F.adaptive_avg_pool2d(x, (min(16, x.shape[-2]), min(16, x.shape[-1])))
        pooled[name] = x.flatten(1)
    names = list(parts)
    found: List[Tuple[float, str, str, str, str]] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            xa, xb = pooled[a], pooled[b]
            d2 = (xa.pow(2).sum(1)[:, None] + xb.pow(2).sum(1)[None] - 2 * xa @ xb.T).clamp_min(0) / xa.shape[1]
            ia, ib = torch.nonzero(d2 < near_mse, as_tuple=True)
            ids_a, ids_b = parts[a].identity(), parts[b].identity()
            found += [(float(d2[u, v]), ids_a[u], a, ids_b[v], b) for u, v in zip(ia.tolist(), ib.tolist())]
    if not found:
        return []
    found.sort()
    listed = "; ".join(f"{x!r} ({sa}) ~ {y!r} ({sb}), MSE {d:.2g}" for d, x, sa, y, sb in found[:max_listed])
    more = f" and {len(found) - max_listed} more" if len(found) > max_listed else ""
    return [f"{len(found)} near-duplicate image pair(s) across sets (pooled pixel MSE < {near_mse:g}): {listed}{more}. "
            "They inflate membership scores; remove one image of each pair, or keep both on one side."]


@dataclass
class _Scored:
    """Per attack: the report entry, the scores kept for the verdict and pooling, the evaluation ROC."""

    results: Dict[str, Dict[str, Any]]
    kept: Dict[str, AttackScores]
    roc: Dict[str, Tuple[List[float], List[float]]]


def _score_attacks(ctx: ScoreContext, plan: _Plan) -> _Scored:
    scored = _Scored({}, {}, {})
    labels, ev_idx = plan.labels, plan.eval_index
    for attack in plan.attacks:
        ta = time.time()
        out = attack.run(ctx, plan.cal_index, labels[plan.cal_index])
        entry = _score_attack(attack, out, labels, ev_idx, plan.config)
        scored.results[attack.name] = {**entry, "seconds": round(time.time() - ta, 2)}
        scored.kept[attack.name] = _kept_scores(attack, out, labels, ev_idx)
        ev = out.scores[ev_idx]
        fpr, tpr, _ = M.roc_curve(ev[labels[ev_idx] == 1], ev[labels[ev_idx] == 0])
        scored.roc[attack.name] = (fpr.tolist(), tpr.tolist())
    return scored


def _score_attack(attack: Attack, out: AttackOutput, labels: np.ndarray, eval_index: np.ndarray,
                  cfg: AuditConfig) -> Dict[str, Any]:
    s = np.asarray(out.scores, dtype=np.float64)
    if s.shape != labels.shape:
        raise AuditError(f"attack {attack.name!r} returned {s.shape} scores for {labels.size} samples.")
    ci = out.calibration_index
    thr, cal_bacc = M.best_threshold(s[ci][labels[ci] == 1], s[ci][labels[ci] == 0])
    ev = s[eval_index]
    lab = labels[eval_index]
    chosen = dict(out.chosen)
    if "calibration_auc" not in chosen:  # e.g. a plugin attack: the AUC of its threshold-setting scores
        chosen["calibration_auc"] = M.auc(s[ci][labels[ci] == 1], s[ci][labels[ci] == 0])
    d = attack_metrics(attack.title or attack.name, attack.uses_model, ev[lab == 1], ev[lab == 0], thr, cfg)
    d["calibration"] = {**chosen, "balanced_accuracy": cal_bacc}
    if out.curves:
        d["curves_eval_auc"] = {
            fam: {lbl: M.auc(v[eval_index][lab == 1], v[eval_index][lab == 0]) for lbl, v in c.items()}
            for fam, c in out.curves.items()
        }
    return d


def _kept_scores(attack: Attack, out: AttackOutput, labels: np.ndarray, eval_index: np.ndarray) -> AttackScores:
    s = np.asarray(out.scores, dtype=np.float64)
    ci = np.asarray(out.calibration_index)
    return AttackScores(eval_scores=s[eval_index].copy(), cal_scores=s[ci].copy(), cal_labels=labels[ci].copy(),
                        uses_model=attack.uses_model)


def _assemble(plan: _Plan, ctx: ScoreContext, scored: _Scored, *, title: str,
              utility: Optional[Mapping[str, Any]], info: Optional[Mapping[str, Any]], t0: float) -> AuditReport:
    cfg, ev_labels = plan.config, plan.labels[plan.eval_index]
    verdict = assess(scored.kept, ev_labels, scored.results, seed=cfg.seed, settings=plan.verdict_settings)
    if plan.warnings:  # near-duplicates across sets inflate every score: the verdict says so too
        verdict["warnings"] = list(plan.warnings) + list(verdict.get("warnings") or [])
    run_info = {**dict(info or {}), **({"references": plan.references.summary()} if plan.references else {}),
                **({"warnings": plan.warnings} if plan.warnings else {}),
                **({"skipped_attacks": plan.skipped} if plan.skipped else {})}
    report = AuditReport(
        title=title,
        verdict=verdict,
        attacks=scored.results,
        max_over_attacks=upper_envelope(scored.results),
        utility={**_utility(ctx, plan.labels, plan.eval_index), **dict(utility or {})},
        splits={k: len(v) for k, v in plan.parts.items()},
        null_band=M.null_band(len(plan.parts["member_eval"]), len(plan.parts["nonmember_eval"])),
        config=cfg.to_dict(),
        timesteps={"loss_grid": ctx.timesteps, **cfg.schedules(ctx.T), "T": ctx.T},
        passes=dict(ctx.passes),
        info=run_info,
        seconds=round(time.time() - t0, 2),
        manifest=None,  # AuditReport.write writes manifest.json and sets this
        roc=scored.roc,
        manifest_sets=plan.sets,
        manifest_extra={**plan.manifest_extra, "seed": cfg.seed},
        scores=scored.kept,
        eval_labels=ev_labels,
        generated=kept_nearest(ctx),  # the generation attack's nearest LoRA samples (None when it did not run)
    )
    return attach_exposure(report)  # the members ranked by the headline attack, near-copy flags (exposure.png)


def _utility(ctx: ScoreContext, labels: np.ndarray, eval_index: np.ndarray) -> Dict[str, Any]:
    u: Dict[str, Any] = {}
    if not ctx.is_cached("grid:True"):
        return u
    g = ctx.loss_grid(True)
    lab = labels[eval_index]
    u["heldout_denoising_loss"] = float(g[eval_index][lab == 0].mean())
    u["member_denoising_loss"] = float(g[eval_index][lab == 1].mean())
    if ctx.is_cached("grid:False"):
        gb = ctx.loss_grid(False)
        u["heldout_denoising_loss_base"] = float(gb[eval_index][lab == 0].mean())
    u["note"] = "mean squared noise error on the evaluation split, same (t, noise) draws as the attacks"
    return u
