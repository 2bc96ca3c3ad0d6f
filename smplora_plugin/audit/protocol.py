"""The audit protocol: splits, calibration, metrics per attack and over attacks, utility.

:func:`run_audit` is the entry point used by ``smplora audit`` and ``smplora demo``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import metrics as M
from . import stats as S
from .attacks import Attack, resolve_attacks
from .engine import AuditConfig, ScoreContext
from .target import AuditError, check_target
from .verdict import AttackScores, VerdictSettings, assess

MIN_PER_SIDE = 4  # fewer members or non-members in a split and no metric means anything


@dataclass
class AuditSamples:
    """Images ``(N, C, H, W)`` in [-1, 1], optional captions and optional identities.

    ``ids`` name the samples in the manifest and drive the identity split (e.g. file paths or
    person ids: samples with the same id stay together); by default each image is identified by
    the SHA-256 of its pixels. Identical pixels in two sets are refused whatever the ids.
    """

    images: torch.Tensor
    captions: Optional[List[str]] = None
    ids: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim < 2:
            raise AuditError("AuditSamples.images must be a tensor (N, C, H, W) in [-1, 1].")
        n = self.images.shape[0]
        if self.captions is not None:
            self.captions = [str(c) for c in self.captions]
            if len(self.captions) != n:
                raise AuditError(f"{len(self.captions)} captions for {n} images; give one caption per image.")
        if self.ids is not None:
            self.ids = [str(i) for i in self.ids]
            if len(self.ids) != n:
                raise AuditError(f"{len(self.ids)} ids for {n} images; give one id per image.")
        if not torch.isfinite(self.images).all():
            raise AuditError("images contain NaN or infinity.")
        if self.images.numel() and (float(self.images.max()) > 1.01 or float(self.images.min()) < -1.01):
            raise AuditError(
                f"images range over [{float(self.images.min()):.3g}, {float(self.images.max()):.3g}]; they must be in "
                "[-1, 1] (x / 127.5 - 1 for 8-bit pixels, 2 * x - 1 for [0, 1] tensors)."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def identity(self) -> List[str]:
        """The given ids, or else the pixel hashes."""
        return list(self.ids) if self.ids is not None else self.pixel_hashes()

    def pixel_hashes(self) -> List[str]:
        """``sha256:...`` of each image's pixels (float32, C-contiguous; -0.0 counted as 0.0)."""
        x = (self.images.detach().float().cpu() + 0.0).contiguous()
        return ["sha256:" + hashlib.sha256(x[i].numpy().tobytes()).hexdigest() for i in range(x.shape[0])]

    def subset(self, idx: Sequence[int]) -> "AuditSamples":
        idx = list(idx)
        return AuditSamples(self.images[idx], None if self.captions is None else [self.captions[i] for i in idx],
                            None if self.ids is None else [self.ids[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence["AuditSamples"]) -> "AuditSamples":
        caps = None if any(p.captions is None for p in parts) else [c for p in parts for c in p.captions]
        ids = [i for p in parts for i in p.identity()]
        return AuditSamples(torch.cat([p.images for p in parts]), caps, ids)


SamplesLike = Union[AuditSamples, torch.Tensor, Tuple[torch.Tensor, Sequence[str]]]


def as_samples(x: SamplesLike, what: str) -> AuditSamples:
    if isinstance(x, AuditSamples):
        return x
    if isinstance(x, torch.Tensor):
        return AuditSamples(x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], torch.Tensor):
        return AuditSamples(x[0], list(x[1]))
    raise AuditError(f"{what} must be AuditSamples, an image tensor, or (images, captions); got {type(x).__name__}.")


def split_calibration(samples: AuditSamples, fraction: float, seed: int, what: str) -> Tuple[AuditSamples, AuditSamples]:
    """Split by identity into (calibration, evaluation) with the core's holdout helper."""
    from ..holdout import split_by_identity

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


def run_audit(
    target: Any,
    members: SamplesLike,
    nonmembers: SamplesLike,
    *,
    calibration_members: Optional[SamplesLike] = None,
    calibration_nonmembers: Optional[SamplesLike] = None,
    calibration_fraction: float = 0.5,
    attacks: Optional[Sequence[Any]] = None,
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
) -> "AuditReport":
    """Audit ``target`` (an :class:`~.target.AuditTarget`) on member / non-member samples.

    Without ``calibration_members``/``calibration_nonmembers``, ``members`` and ``nonmembers``
    are each split by identity into a calibration (attack-training) part and an evaluation part
    (``calibration_fraction``, seeded by ``config.seed``). Everything tuned (candidate timestep,
    sign, threshold, MLP checkpoint, classifier) uses the calibration part only; metrics use the
    evaluation part only. ``attacks``: names, classes or instances (default: the whole suite;
    CLiD only when captions exist). ``utility``: extra utility fields shown in the report (e.g.
    ratio to plain LoRA, sample quality). ``manifest_sets``: extra named id lists (e.g. the
    defense's ``member_defense`` / ``nonmember_defense``) recorded in, and checked for overlap by,
    the manifest. ``info``: free-form run facts (steps per image, model, ...) for the report.
    With ``out_dir``, writes ``report.json``, ``report.md``, ``roc.png``, ``per_timestep_auc.png``
    and ``manifest.json``. ``num_threads``: torch CPU threads during the audit (restored
    afterwards); ``None`` means 1, which is fastest on a busy machine, where spinning OpenMP threads
    fight for cores. ``n_permutations``: label permutations behind the verdict's p-values (>= 1000).
    The report's ``verdict`` block holds the calibrated headline, the upper envelope with its
    permutation null, power, sample sizes needed, warnings and the empirical epsilon lower bound
    (see :mod:`.verdict`). Several LoRAs: :func:`run_audit_pooled`. ``references``: reference models
    (:class:`~.references.References`) for LiRA / RMIA, which then join the default suite.
    """
    check_target(target)
    cfg = config if isinstance(config, AuditConfig) else AuditConfig.from_dict(dict(config or {}))
    cfg.validate()
    vset = VerdictSettings(n_permutations=int(n_permutations))
    vset.validate()
    threads = 1 if num_threads is None else num_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise AuditError(f"num_threads={num_threads!r} must be a whole number >= 1 (or None for 1).")
    mem, non = as_samples(members, "members"), as_samples(nonmembers, "nonmembers")
    if (calibration_members is None) != (calibration_nonmembers is None):
        raise AuditError("give both calibration_members and calibration_nonmembers, or neither.")
    if calibration_members is None:
        m_cal, m_ev = split_calibration(mem, calibration_fraction, cfg.seed, "member")
        n_cal, n_ev = split_calibration(non, calibration_fraction, cfg.seed + 1, "non-member")
    else:
        m_cal, n_cal = as_samples(calibration_members, "calibration_members"), as_samples(calibration_nonmembers, "calibration_nonmembers")
        m_ev, n_ev = mem, non
    parts = {"member_calibration": m_cal, "nonmember_calibration": n_cal, "member_eval": m_ev, "nonmember_eval": n_ev}
    for name, p in parts.items():
        if len(p) < MIN_PER_SIDE:
            raise AuditError(f"the {name} split has {len(p)} samples; at least {MIN_PER_SIDE} are needed "
                             "(give more images or change calibration_fraction).")
    shapes = {tuple(p.images.shape[1:]) for p in parts.values()}
    if len(shapes) != 1:
        raise AuditError(f"all images must have the same shape, got {sorted(shapes)}; resize them first.")
    has_caps = all(p.captions is not None for p in parts.values())
    skipped: Dict[str, str] = {}
    attack_objs = resolve_attacks(list(attacks) if attacks is not None else None, has_caps, load_plugins,
                                  target=target, skipped=skipped)

    # the manifest checks that no sample sits in two sets before any model work
    from ..holdout import write_manifest

    sets = {name: p.identity() for name, p in parts.items()}
    for name, ids in (manifest_sets or {}).items():
        if name in sets:
            raise AuditError(f"manifest set name {name!r} is reserved; choose another name.")
        sets[name] = [str(i) for i in ids]
    _check_overlap(sets)
    warnings = check_pixel_overlap(parts, cfg.near_duplicate_mse)
    for w in warnings:
        print(f"smplora audit: WARNING: {w}", file=sys.stderr)
    from .references import check_compatible, match, select_attacks

    ref_view = None
    if references is not None:  # matched in the order of the score context below
        ref_view = match(references, AuditSamples.concat([parts[k] for k in
                                                          ("member_calibration", "nonmember_calibration",
                                                           "member_eval", "nonmember_eval")]))
        check_compatible(ref_view, target, parts["member_calibration"].images)
        info = {**dict(info or {}), "references": ref_view.summary()}
    attack_objs = select_attacks(attack_objs, attacks is None, ref_view)
    manifest_path = None
    manifest_extra = {"calibration_fraction": calibration_fraction if calibration_members is None else None}
    if out_dir is not None:
        manifest_path = write_manifest(Path(out_dir) / "manifest.json", sets, seed=cfg.seed, extra=manifest_extra)

    t0 = time.time()
    order = ["member_calibration", "nonmember_calibration", "member_eval", "nonmember_eval"]
    allp = AuditSamples.concat([parts[k] for k in order])
    sizes = [len(parts[k]) for k in order]
    bounds = np.cumsum([0] + sizes)
    labels = np.concatenate([np.full(s, 1 if k.startswith("member") else 0) for k, s in zip(order, sizes)])
    cal_index = np.arange(bounds[0], bounds[2])
    eval_index = np.arange(bounds[2], bounds[4])
    results: Dict[str, Dict[str, Any]] = {}
    kept: Dict[str, AttackScores] = {}
    roc: Dict[str, Tuple[List[float], List[float]]] = {}
    # denormal floats (near-black images through a small UNet) slow CPU inference ~10x; flushing
    # them to zero changes no score measurably. The default (off) is restored afterwards.
    flushed = torch.set_flush_denormal(True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ctx = ScoreContext(target, allp.images, allp.captions if has_caps else None, cfg, progress=progress)
        ctx.references = ref_view
        for attack in attack_objs:
            ta = time.time()
            out = attack.run(ctx, cal_index, labels[cal_index])
            results[attack.name] = _score_attack(attack, out, labels, eval_index, cfg)
            results[attack.name]["seconds"] = round(time.time() - ta, 2)
            kept[attack.name] = _kept_scores(attack, out, labels, eval_index)
            ev = out.scores[eval_index]
            fpr, tpr, _ = M.roc_curve(ev[labels[eval_index] == 1], ev[labels[eval_index] == 0])
            roc[attack.name] = (fpr.tolist(), tpr.tolist())
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        torch.set_num_threads(old_threads)

    util = _utility(ctx, labels, eval_index)
    util.update(dict(utility or {}))
    n_m, n_n = sizes[2], sizes[3]
    verdict = assess(kept, labels[eval_index], results, seed=cfg.seed, settings=vset)
    if warnings:  # near-duplicates across sets inflate every score: the verdict says so too
        verdict["warnings"] = list(warnings) + list(verdict.get("warnings") or [])
    report = AuditReport(
        title=title,
        verdict=verdict,
        attacks=results,
        max_over_attacks=_max_over(results),
        utility=util,
        splits={k: len(v) for k, v in parts.items()},
        null_band=M.null_band(n_m, n_n),
        config=cfg.to_dict(),
        timesteps={"loss_grid": ctx.timesteps, "sima": ctx.sima_timesteps, "pia": ctx.pia_timesteps,
                   "secmi": [ctx.secmi_t, ctx.secmi_step], "clid": ctx.clid_timesteps, "T": ctx.T},
        passes=dict(ctx.passes),
        info={**dict(info or {}), **({"warnings": warnings} if warnings else {}),
              **({"skipped_attacks": skipped} if skipped else {})},
        seconds=round(time.time() - t0, 2),
        manifest=str(manifest_path) if manifest_path else None,
        roc=roc,
        manifest_sets=sets,
        manifest_extra={**manifest_extra, "seed": cfg.seed},
        scores=kept,
        eval_labels=labels[eval_index],
    )
    if out_dir is not None:
        report.write(out_dir)
    return report


def _check_overlap(sets: Mapping[str, Sequence[str]]) -> None:
    seen: Dict[str, str] = {}
    for name, ids in sets.items():
        for i in set(ids):
            if i in seen and seen[i] != name:
                raise AuditError(f"sample {i!r} is in both {seen[i]!r} and {name!r}: members, non-members and the "
                                 "defense's sets must be disjoint. Remove the duplicate from one of them.")
            seen[i] = name


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
    import torch.nn.functional as F

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
def _metrics(title: str, uses_model: bool, member: np.ndarray, nonmember: np.ndarray, threshold: Optional[float],
             cfg: AuditConfig) -> Dict[str, Any]:
    ms = M.evaluate(member, nonmember, threshold=threshold, n_boot=cfg.n_boot, seed=cfg.seed)
    return {"title": title, "uses_model": uses_model, **ms.to_dict(),
            "low_fpr": S.low_fpr_summary(member, nonmember, n_boot=cfg.n_boot, seed=cfg.seed)}


def _kept_scores(attack: Attack, out: Any, labels: np.ndarray, eval_index: np.ndarray) -> AttackScores:
    s = np.asarray(out.scores, dtype=np.float64)
    ci = np.asarray(out.calibration_index)
    return AttackScores(eval_scores=s[eval_index].copy(), cal_scores=s[ci].copy(), cal_labels=labels[ci].copy(),
                        uses_model=attack.uses_model)


def _score_attack(attack: Attack, out: Any, labels: np.ndarray, eval_index: np.ndarray, cfg: AuditConfig) -> Dict[str, Any]:
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
    d = _metrics(attack.title or attack.name, attack.uses_model, ev[lab == 1], ev[lab == 0], thr, cfg)
    d["calibration"] = {**chosen, "balanced_accuracy": cal_bacc}
    if out.curves:
        d["curves_eval_auc"] = {
            fam: {lbl: M.auc(v[eval_index][lab == 1], v[eval_index][lab == 0]) for lbl, v in c.items()}
            for fam, c in out.curves.items()
        }
    return d


_MAX_KEYS = ("auc", "leakage", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy")


ENVELOPE_LABEL = ("upper envelope: each metric's maximum over the model-using attacks on the evaluation split; "
                  "selected on that split, so optimistic (see verdict.upper_envelope for its permutation null)")


def _max_over(results: Mapping[str, Dict[str, Any]]) -> Dict[str, Any]:
    model = {k: v for k, v in results.items() if v["uses_model"]}
    out: Dict[str, Any] = {"label": ENVELOPE_LABEL}
    for key in _MAX_KEYS:
        vals = [(v[key], k) for k, v in model.items() if v[key] is not None]
        out[key] = {"value": max(vals)[0], "attack": max(vals)[1]} if vals else None
    for key in ("tpr_at_5pct_fpr", "asr_best_threshold_on_eval"):
        vals = [(v["paper_comparison"][key], k) for k, v in model.items() if v["paper_comparison"][key] is not None]
        out["paper_" + key] = {"value": max(vals)[0], "attack": max(vals)[1]} if vals else None
    if out.get("auc"):
        out["auc"]["ci95"] = model[out["auc"]["attack"]]["auc_ci95"]
    return out


def _utility(ctx: ScoreContext, labels: np.ndarray, eval_index: np.ndarray) -> Dict[str, Any]:
    u: Dict[str, Any] = {}
    if "grid:True" not in ctx._cache:
        return u
    g = ctx.loss_grid(True)
    lab = labels[eval_index]
    u["heldout_denoising_loss"] = float(g[eval_index][lab == 0].mean())
    u["member_denoising_loss"] = float(g[eval_index][lab == 1].mean())
    if "grid:False" in ctx._cache:
        gb = ctx.loss_grid(False)
        u["heldout_denoising_loss_base"] = float(gb[eval_index][lab == 0].mean())
    u["note"] = "mean squared noise error on the evaluation split, same (t, noise) draws as the attacks"
    return u


@dataclass
class AuditReport:
    """Result of :func:`run_audit`; ``to_dict()`` is the content of report.json."""

    title: str
    attacks: Dict[str, Dict[str, Any]]
    max_over_attacks: Dict[str, Any]
    utility: Dict[str, Any]
    splits: Dict[str, int]
    null_band: Tuple[float, float]
    config: Dict[str, Any]
    timesteps: Dict[str, Any]
    passes: Dict[str, int]
    info: Dict[str, Any]
    seconds: float
    manifest: Optional[str]
    roc: Dict[str, Tuple[List[float], List[float]]]
    manifest_sets: Optional[Dict[str, List[str]]] = None
    manifest_extra: Optional[Dict[str, Any]] = None
    verdict: Optional[Dict[str, Any]] = None
    scores: Optional[Dict[str, AttackScores]] = field(default=None, repr=False)  # kept for pooling, not serialised
    eval_labels: Optional[np.ndarray] = field(default=None, repr=False)
    runs: Optional[List["AuditReport"]] = field(default=None, repr=False)  # pooled report: the per-run reports
    pooling: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        try:
            from .. import __version__ as version
        except ImportError:  # the core package metadata is not importable (source checkout in progress)
            version = "unknown"

        d: Dict[str, Any] = {
            "format": "smplora-audit-report/1",
            "smplora_version": version,
            "title": self.title,
            "verdict": self.verdict,
            "splits": self.splits,
            "null_band_auc95": list(self.null_band),
            "max_over_attacks": self.max_over_attacks,
            "attacks": self.attacks,
            "utility": self.utility,
            "info": self.info,
            "config": self.config,
            "timesteps": self.timesteps,
            "model_passes_per_sample": {k: v / max(1, sum(self.splits.values())) for k, v in self.passes.items()},
            "seconds": self.seconds,
            "manifest": self.manifest,
        }
        if self.pooling is not None:
            d["pooling"] = self.pooling
        if self.runs is not None:
            d["runs"] = [r.to_dict() for r in self.runs]
        return d

    def markdown(self) -> str:
        from .report import render_markdown

        return render_markdown(self.to_dict())

    def write(self, out_dir: Union[str, Path]) -> Dict[str, Path]:
        """Write report.json, report.md, roc.png, per_timestep_auc.png and manifest.json to ``out_dir``."""
        from ..holdout import write_manifest
        from .report import write_report

        out = Path(out_dir)
        if self.manifest_sets is not None:
            extra = dict(self.manifest_extra or {})
            seed = extra.pop("seed", None)
            self.manifest = str(write_manifest(out / "manifest.json", self.manifest_sets, seed=seed, extra=extra))
        paths = write_report(self, out)
        if self.manifest is not None:
            paths["manifest"] = Path(self.manifest)
        for i, (name, run) in enumerate(zip(self.run_names(), self.runs or [])):
            for k, v in run.write(out / run_folder(i, name)).items():
                paths[f"run_{i + 1}_{k}"] = v
        return paths

    def run_names(self) -> List[str]:
        """Names of the pooled runs (empty for a single-run report)."""
        return list((self.pooling or {}).get("runs", []))


def run_folder(index: int, name: str) -> str:
    """Sub-folder of a pooled report for run ``index`` (0-based): ``run_01_<name>``."""
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:40] or "run"
    return f"run_{index + 1:02d}_{slug}"
