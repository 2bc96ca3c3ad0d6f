"""The demo end to end: base model, plain LoRA vs SMP-LoRA (and MP-LoRA), audit, utility, report.

:func:`run_demo` is what ``smplora demo`` runs. Protocol (docs/demo.md):

- Images (digits, or the generated textures with ``dataset="textures"``) are split by identity:
  a fixed public pool (base model and classifier) and, from the private pool, members (the
  LoRA's training set), the defense's non-members (seen only by SMP-LoRA's proxy attacker), and
  the audit's calibration and evaluation non-members.
- The members are split by identity into audit-calibration and audit-evaluation halves; every
  member is trained on. The audit tunes its attacks on the calibration sets only.
- Plain LoRA and each defense start from the same base, LoRA initialisation, member batches,
  timesteps and noise; only the objective differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import ConfigError
from .data import DigitSet, DigitSplits
from .datasets import NAMES as DATASETS
from .datasets import DemoDataset, get_dataset
from .model import TinyLDM, load_base, save_base

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class DemoConfig:
    """Everything the demo does; ``quick()`` is the reduced size used in CI."""

    seed: int = 0
    dataset: str = "digits"
    members: int = 64
    nonmember_defense: int = 64
    nonmember_calibration: int = 96
    nonmember_eval: int = 200
    steps: int = 600
    batch_size: int = 32
    lora_rank: int = 8
    lora_lr: float = 1e-3
    variants: Tuple[str, ...] = ("plain", "smp", "smp-robust")
    smp_alpha: float = 10.0
    mp_alpha: float = 0.05
    attacker_lr: float = 1e-3
    k_steps: int = 5
    base_steps: int = 2500
    base_batch_size: int = 64
    base_lr: float = 2e-3
    classifier_epochs: int = 30
    samples_per_label: int = 20
    sample_steps: int = 20
    guidance: float = 1.0
    audit: Dict[str, Any] = field(default_factory=dict)
    attacks: Optional[Tuple[str, ...]] = None  # None = the whole suite
    references: int = 0  # > 0: train this many reference LoRAs for LiRA / RMIA (see reference_models)
    reference_variant: str = "plain"  # how the references are trained: any variant, e.g. "smp-robust"

    @classmethod
    def quick(cls, **kw: Any) -> "DemoConfig":
        """A reduced demo for CI (16 members, 200 steps, 64 evaluation non-members, fewer audit draws)."""
        base = dict(members=16, nonmember_defense=32, nonmember_calibration=48, nonmember_eval=64, steps=200,
                    samples_per_label=8, sample_steps=10, audit={"draws": 2, "n_boot": 200, "mlp_max_epochs": 60})
        base.update(kw)
        return cls(**base)

    @property
    def data(self) -> DemoDataset:
        """The :class:`~smplora_plugin.demo.datasets.DemoDataset` named by ``dataset``."""
        return get_dataset(self.dataset)

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset={self.dataset!r} is unknown; choose one of {list(DATASETS)}.")
        for name in ("members", "nonmember_defense", "nonmember_calibration", "nonmember_eval", "steps", "batch_size",
                     "lora_rank", "base_steps", "base_batch_size", "classifier_epochs", "samples_per_label",
                     "sample_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}.")
        if self.members < 8:
            raise ConfigError(f"members={self.members}: the audit splits members into calibration and evaluation "
                             "halves and needs at least 4 in each; use --members 8 or more.")
        if self.nonmember_calibration < 4 or self.nonmember_eval < 4:
            raise ConfigError("the audit needs at least 4 calibration and 4 evaluation non-members.")
        for name in ("lora_lr", "attacker_lr", "base_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if isinstance(self.k_steps, bool) or not isinstance(self.k_steps, int) or self.k_steps < 0:
            raise ConfigError(f"k_steps must be a whole number >= 0, got {self.k_steps!r}.")
        if self.smp_alpha < 0 or self.mp_alpha < 0:
            raise ConfigError("smp_alpha and mp_alpha must be >= 0.")
        if isinstance(self.references, bool) or not isinstance(self.references, int) or self.references == 1 \
                or self.references < 0:
            raise ConfigError(f"references={self.references!r}: 0 (no LiRA / RMIA) or at least 2 reference LoRAs.")
        if self.reference_variant not in VARIANT_TITLES:
            raise ConfigError(f"reference_variant={self.reference_variant!r}; choose one of {list(VARIANT_TITLES)}.")
        bad = [v for v in self.variants if v not in VARIANT_TITLES]
        if bad or "plain" not in self.variants:
            raise ConfigError(f"variants must include 'plain' and may add 'smp', 'smp-robust' and 'mp'; "
                             f"got {list(self.variants)}.")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["variants"] = list(self.variants)
        d["attacks"] = None if self.attacks is None else list(self.attacks)
        return d


# ---------------------------------------------------------------------------------------------
# base model and classifier: shipped assets, or trained here


def base_recipe(cfg: DemoConfig) -> Dict[str, str]:
    """Header facts that must match for shipped weights to be reused."""
    return {"smplora.demo.base_recipe": json.dumps({"steps": cfg.base_steps, "batch_size": cfg.base_batch_size,
                                                    "lr": cfg.base_lr, "seed": 0, "pool": cfg.data.pool_tag},
                                                   sort_keys=True)}


def train_assets(cfg: DemoConfig, *, progress: bool = True) -> Tuple[TinyLDM, "Any"]:
    """Train the base model and the classifier on the data set's public pool (deterministic)."""
    from .train import train_base

    pub = cfg.data.public_pool()
    model = TinyLDM(cfg.data.model_config, seed=0)
    train_base(model, pub, steps=cfg.base_steps, batch_size=cfg.base_batch_size, lr=cfg.base_lr, seed=0,
               progress=progress)
    clf = cfg.data.train_classifier(cfg.classifier_epochs, progress=progress)
    return model, clf


def save_assets(model: TinyLDM, clf: Any, cfg: DemoConfig, folder: Union[str, Path]) -> Dict[str, Path]:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = cfg.data
    save_base(model, folder / ds.base_file, extra=base_recipe(cfg))
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(folder / ds.classifier_file),
              metadata={"smplora.demo.kind": f"{ds.name}-classifier" if ds.name != "digits" else "digit-classifier",
                        "smplora.demo.classifier_epochs": str(ds.classifier_epochs or cfg.classifier_epochs)})
    for name in (ds.base_file, ds.classifier_file):
        (folder / name).chmod(0o644)
    return {"base": folder / ds.base_file, "classifier": folder / ds.classifier_file}


def load_assets(cfg: DemoConfig, folder: Union[str, Path] = ASSETS) -> Optional[Tuple[TinyLDM, Any]]:
    """Shipped base + classifier if both exist and were made with this model config and recipe."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    ds = cfg.data
    bpath, cpath = folder / ds.base_file, folder / ds.classifier_file
    if not (bpath.is_file() and cpath.is_file()):
        return None
    with safe_open(str(bpath), framework="pt") as f:
        meta = f.metadata() or {}
    if any(meta.get(k) != v for k, v in base_recipe(cfg).items()):
        return None
    model = load_base(bpath, ds.model_config)
    if model is None:
        return None
    clf = ds.make_classifier()
    clf.load_state_dict(load_file(str(cpath)))
    clf.eval().requires_grad_(False)
    return model, clf


# ---------------------------------------------------------------------------------------------
# the demo


def _samples(d: DigitSet):
    from ..audit import AuditSamples

    return AuditSamples(d.images, d.captions, d.ids)


def _member_halves(members: DigitSet, seed: int) -> Tuple[DigitSet, DigitSet]:
    from ..holdout import split_by_identity

    n_cal = len(members) // 2
    parts = split_by_identity(members.ids, {"calibration": n_cal, "eval": len(members) - n_cal}, seed=seed + 101)
    pos = {s: i for i, s in enumerate(members.ids)}
    return (members.subset(sorted(pos[s] for s in parts["calibration"])),
            members.subset(sorted(pos[s] for s in parts["eval"])))


def _regularizer(cfg: DemoConfig, variant: str):
    from .. import PrivacyConfig, PrivacyRegularizer

    if variant == "plain":
        return None
    lat = cfg.data.model_config.latent_size
    common = dict(feature_grid=lat, seed=cfg.seed)
    if variant == "smp-robust":  # the library's preset as it ships, only sized for the tiny latents
        return PrivacyRegularizer(PrivacyConfig.preset("robust", **common), load_entry_points=False)
    objective = "mp" if variant == "mp" else "smp"
    alpha = cfg.smp_alpha if variant == "smp" else cfg.mp_alpha
    return PrivacyRegularizer(objective=objective, alpha=alpha, attacker_lr=cfg.attacker_lr, k_steps=cfg.k_steps,
                              load_entry_points=False, **common)


VARIANT_TITLES = {"plain": "plain LoRA", "smp": "SMP-LoRA", "smp-robust": "SMP-LoRA robust", "mp": "MP-LoRA"}
BASE_TITLE = "base model (no LoRA)"


def _verdict_line(v: Optional[Mapping[str, Any]]) -> str:
    if not v or v.get("verdict") is None:
        return "no verdict"
    h = v["headline"]
    return f"{v['verdict']} (headline {h['attack']} AUC {h['auc']:.3f}, p = {h['p_value']:.3g})"


def run_demo(cfg: DemoConfig, out_dir: Union[str, Path], *, progress: bool = True,
             assets: Union[str, Path, None] = ASSETS, log=print, jobs: int = 1) -> Dict[str, Any]:
    """Run the demo; writes reports under ``out_dir`` and returns the summary (also ``summary.json``).

    ``jobs``: columns trained and audited at once, each in a spawned worker process with this process's
    torch thread count (:mod:`.columns`; the figures do not depend on it). With ``jobs > 1``, call it under
    ``if __name__ == "__main__":`` in a script.
    """
    from .columns import Shared, columns_of, run_columns
    from .quality import FEATURE_SPACE

    cfg.validate()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}: use a whole number >= 1 (worker processes; 1 runs the columns one "
                          "after another here).")
    ds = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    torch.manual_seed(cfg.seed)
    flushed = torch.set_flush_denormal(True)
    try:
        splits = ds.splits({"member": cfg.members, "nonmember_defense": cfg.nonmember_defense,
                              "nonmember_calibration": cfg.nonmember_calibration,
                              "nonmember_eval": cfg.nonmember_eval}, cfg.seed)
        t0 = time.time()
        loaded = load_assets(cfg, assets) if assets is not None else None
        if loaded is None:
            log("No matching shipped base weights: training the base model and the classifier on the public pool...")
            base, clf = train_assets(cfg, progress=progress)
            base_source = "trained in this run"
        else:
            base, clf = loaded
            base_source = f"shipped weights ({Path(assets) / ds.base_file})"
        base_sd = base.base_state_dict()
        timings: Dict[str, float] = {"base_and_classifier": round(time.time() - t0, 1)}
        m_cal, m_eval = _member_halves(splits["member"], cfg.seed)
        refs = None
        if cfg.references:
            t0 = time.time()
            log(f"Training {cfg.references} reference LoRAs ({cfg.reference_variant}) on random halves of the "
                "audited pool ...")
            refs = reference_models(cfg, base_sd, splits, progress=progress, log=log)
            timings["train_references"] = round(time.time() - t0, 1)
        reference = DigitSet.concat(splits["nonmember_calibration"], splits["nonmember_eval"])
        base_quality = ds.sample_quality(base, clf, splits["member"], reference, per_label=cfg.samples_per_label,
                                         steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
        base_quality["real_digits_frechet_distance"] = _real_floor(clf, ds.real_data(), reference,
                                                                   10 * cfg.samples_per_label, cfg.seed)
        shared = Shared(cfg=cfg, splits=splits, member_cal=m_cal, member_eval=m_eval, base_sd=base_sd, classifier=clf,
                        references=refs, base_source=base_source, base_quality=base_quality,
                        quality_reference=reference,
                        feature_space=FEATURE_SPACE if ds.name == "digits" else FEATURE_SPACE.replace("digit", ds.name))
        done = run_columns(shared, out, jobs=jobs, progress=progress, log=log)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    plain_heldout = done["plain"]["report"].utility.get("heldout_denoising_loss")
    for column in columns_of(cfg):
        report = done[column]["report"]
        held = report.utility.get("heldout_denoising_loss")
        report.utility["heldout_loss_ratio_to_plain_lora"] = None if (held is None or not plain_heldout) \
            else held / plain_heldout
        report.write(out / column)
        timings.update(done[column]["seconds"])
    results = {v: {"title": done[v]["title"], "report": done[v]["report"].to_dict(), "training": done[v]["training"],
                   "lora_file": done[v]["lora_file"]} for v in cfg.variants}
    base_result = {"title": BASE_TITLE, "report": done["base"]["report"].to_dict(), "training": None,
                   "lora_file": None, "report_dir": str(out / "base")}
    timings["total"] = round(time.time() - t_all, 1)
    summary = build_summary(cfg, splits, results, base_quality, base_source, timings, base_audit=base_result)
    summary["jobs"] = min(jobs, len(columns_of(cfg)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "summary.md").write_text(render_table(summary) + "\n")
    from ..holdout import write_manifest

    write_manifest(out / "manifest.json", {**{k: v.ids for k, v in splits.sets.items()}, "public": splits.public.ids},
                   seed=cfg.seed, extra={"note": "members are all trained on; the audit splits them into calibration "
                                                 "and evaluation halves (see <variant>/manifest.json)"})
    return summary


def reference_models(cfg: DemoConfig, base_sd: Mapping[str, torch.Tensor], splits: DigitSplits, *,
                     progress: bool = False, log=print):
    """``cfg.references`` reference LoRAs, trained the demo's way on random halves of the pool.

    The pool is every audited sample (members and the audit's calibration and evaluation
    non-members), so each of them is IN for half of the references (online LiRA / RMIA). Each
    reference has the target's recipe (base, rank, steps, batch size, learning rate) and its own
    LoRA initialisation and batch seed; with a pool twice the member count (``smplora demo
    --references``), a reference trains on about as many images as the target. They are plain
    LoRAs unless ``cfg.reference_variant`` names a defense (an attacker who knows the defense and
    its settings trains the references with it; its non-members are the defense's own set).
    """
    from ..audit import AuditSamples, References
    from .target import TinyLDMTarget
    from .train import train_lora

    pool = DigitSet.concat(splits["member"], splits["nonmember_calibration"], splits["nonmember_eval"])
    pos = {s: i for i, s in enumerate(pool.ids)}

    def trainer(train: AuditSamples, seed: int) -> TinyLDMTarget:
        model = TinyLDM(cfg.data.model_config, seed=0)
        model.load_base_state_dict(base_sd)
        model.add_lora(cfg.lora_rank, seed=seed)
        train_lora(model, pool.subset([pos[i] for i in train.identity()]), steps=cfg.steps, lr=cfg.lora_lr,
                   batch_size=cfg.batch_size, seed=seed,
                   reg=_regularizer(replace(cfg, seed=seed), cfg.reference_variant),
                   nonmembers=splits["nonmember_defense"], name="reference", progress=progress)
        model.requires_grad_(False)
        return TinyLDMTarget(model)

    return References.train(trainer, _samples(pool), cfg.references, seed=cfg.seed + 2027, log=log)


def _real_floor(clf: Any, public: DigitSet, reference: DigitSet, n: int, seed: int) -> float:
    """Fréchet distance of ``n`` real public images to the reference: what a perfect generator would score."""
    from .quality import frechet_distance

    idx = torch.randperm(len(public), generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        return frechet_distance(clf.features(public.images[idx]).numpy(), clf.features(reference.images).numpy())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _save_png(grid: Any, path: Path) -> None:
    from PIL import Image

    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def _save_lora(model: TinyLDM, reg: Any, folder: Path, variant: str, cfg: DemoConfig) -> Path:
    from safetensors.torch import save_file

    path = folder / "lora.safetensors"
    save_file(model.lora_state_dict(), str(path),
              metadata={"format": "pt", "smplora.demo.variant": variant, "smplora.demo.rank": str(cfg.lora_rank)})
    if reg is not None:
        reg.annotate(path)
        reg.save(folder / "smplora_state.safetensors")
    return path


# ---------------------------------------------------------------------------------------------
# summary table


def _column(r: Mapping[str, Any], report_dir: str) -> Dict[str, Any]:
    """One column of the summary: the verdict block first, then the upper envelope, then utility."""
    rep = r["report"]
    mx = rep["max_over_attacks"]
    q = rep["utility"]["sample_quality"]
    v = rep.get("verdict") or {}
    h = v.get("headline") or {}
    env = v.get("upper_envelope") or {}
    eps = v.get("epsilon_lower_bound") or {}
    training = r.get("training") or {}
    return {
        "title": r["title"],
        "verdict": v.get("verdict"),
        "headline_attack": h.get("attack"), "headline_auc": h.get("auc"), "headline_auc_ci95": h.get("auc_ci95"),
        "headline_p_value": h.get("p_value"), "headline_tpr_at_1pct_fpr": h.get("tpr_at_1pct_fpr"),
        "epsilon_lower_bound": eps.get("epsilon"), "epsilon_lower_bound_at_delta": eps.get("epsilon_at_delta"),
        "epsilon_delta": eps.get("delta"),
        "envelope_auc_null_q95": (env.get("auc") or {}).get("null_q95"),
        "envelope_auc_p_value": (env.get("auc") or {}).get("p_value"),
        "smallest_detectable_auc": (v.get("power") or {}).get("smallest_detectable_auc"),
        "warnings": list(v.get("warnings") or []),
        "max_auc": mx["auc"]["value"], "max_auc_attack": mx["auc"]["attack"], "max_auc_ci95": mx["auc"]["ci95"],
        "max_leakage": mx["leakage"]["value"],
        "max_tpr_at_1pct_fpr": (mx.get("tpr_at_1pct_fpr") or {}).get("value"),
        "attacks": {k: {"auc": a["auc"], "auc_ci95": a["auc_ci95"], "tpr_at_1pct_fpr": a["tpr_at_1pct_fpr"],
                        "leakage": a["leakage"], "uses_model": a["uses_model"]} for k, a in rep["attacks"].items()},
        "heldout_loss": rep["utility"].get("heldout_denoising_loss"),
        "heldout_loss_ratio_to_plain": rep["utility"].get("heldout_loss_ratio_to_plain_lora"),
        "member_loss": rep["utility"].get("member_denoising_loss"),
        "classifier_accuracy": q["classifier_accuracy"], "frechet_distance": q["frechet_distance"],
        "style_share_members": q.get("style_share_members"), "style_share_unseen": q.get("style_share_unseen"),
        "kernel_distance": q.get("kernel_distance"),
        "adaptation_loss_last": training.get("adaptation_loss_last"),
        "proxy_attacker": training.get("proxy_attacker"),
        "report_dir": report_dir,
    }


def build_summary(cfg: DemoConfig, splits: DigitSplits, results: Mapping[str, Dict[str, Any]],
                  base_quality: Mapping[str, Any], base_source: str, timings: Mapping[str, float], *,
                  base_audit: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``summary.json``: one column per variant (``variants``) and the base model's audit (``base_model_audit``)."""
    cols = {v: _column(r, str(Path(r["lora_file"]).parent)) for v, r in results.items()}
    if base_quality.get("style_share_members") is not None:  # the style a LoRA adds over the base
        for c in cols.values():
            c["style_gain_members"] = c["style_share_members"] - base_quality["style_share_members"]
            c["style_gain_unseen"] = c["style_share_unseen"] - base_quality["style_share_unseen"]
    first = next(iter(results.values()))["report"] if results else None
    power = ((first or {}).get("verdict") or {}).get("power")
    return {"format": "smplora-demo-summary/1", "config": cfg.to_dict(), "base": base_source,
            "splits": {"public": len(splits.public), **{k: len(v) for k, v in splits.sets.items()}},
            "audit_splits": first["splits"] if first else {},
            "null_band_auc95": first["null_band_auc95"] if first else None,
            "power": power, "verdict_rule": ((first or {}).get("verdict") or {}).get("rule"),
            "base_model_quality": dict(base_quality), "variants": cols,
            "base_model_audit": None if base_audit is None else _column(base_audit, base_audit["report_dir"]),
            "seconds": dict(timings),
            "references": first["info"].get("references") if first else None}


def _auc_ci(x: Optional[float], ci: Optional[Sequence[float]]) -> str:
    return "n/a" if x is None else f"{x:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _pv(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def render_table(s: Mapping[str, Any]) -> str:
    """The side-by-side Markdown table printed by ``smplora demo``.

    Rows: each column's verdict, its headline attack (chosen on calibration) with evaluation AUC
    [CI], p-value and TPR@1%FPR, the empirical epsilon lower bound, then the upper envelope (max
    over attacks on the evaluation split), per-attack AUCs, and utility. The base model (no LoRA),
    when audited, is the first column: the floor every figure sits next to.
    """
    from .._io import fmt as _f
    from ..audit.report import _pct as _p  # not _io.pct: that rounds numpy scalars differently on ties

    cols = dict(s["variants"])
    if s.get("base_model_audit"):
        cols = {"base": s["base_model_audit"], **cols}
    names = list(cols)
    head = "| | " + " | ".join(cols[v]["title"] for v in names) + " |"
    sep = "|---|" + "---|" * len(names)
    rows: List[str] = [head, sep]

    def row(label: str, fn) -> None:
        rows.append(f"| {label} | " + " | ".join(fn(cols[v]) for v in names) + " |")

    row("**verdict**", lambda c: f"**{c.get('verdict') or 'n/a'}**")
    row("headline attack (chosen on calibration)", lambda c: c.get("headline_attack") or "n/a")
    row("**headline AUC** [95% CI]", lambda c: f"**{_auc_ci(c.get('headline_auc'), c.get('headline_auc_ci95'))}**")
    row("headline p-value (one-sided, permutation)", lambda c: _pv(c.get("headline_p_value")))
    row("**headline TPR@1%FPR**", lambda c: f"**{_p(c.get('headline_tpr_at_1pct_fpr'))}**")
    delta = next((c["epsilon_delta"] for c in cols.values() if c.get("epsilon_delta") is not None), None)
    row("empirical epsilon **lower bound** (not a guarantee), delta = 0"
        + ("" if delta is None else f" / {delta:g}"),
        lambda c: f"{_f(c.get('epsilon_lower_bound'), 2)} / {_f(c.get('epsilon_lower_bound_at_delta'), 2)}")
    row("*upper envelope: max AUC over attacks (selected on evaluation, optimistic)*",
        lambda c: f"*{c['max_auc']:.3f} ({c['max_auc_attack']}); null q95 {_f(c.get('envelope_auc_null_q95'))}, "
                  f"p = {_pv(c.get('envelope_auc_p_value'))}*")
    row("*upper envelope: max leakage max(AUC, 1-AUC)*", lambda c: f"*{_f(c['max_leakage'])}*")
    row("*upper envelope: max TPR@1%FPR*", lambda c: f"*{_p(c['max_tpr_at_1pct_fpr'])}*")
    attacks = list(next(iter(cols.values()))["attacks"])
    for a in attacks:
        row(f"{a}: AUC / TPR@1%FPR",
            lambda c, a=a: f"{c['attacks'][a]['auc']:.3f} / {_p(c['attacks'][a]['tpr_at_1pct_fpr'])}")
    row("held-out denoising loss (ratio to plain LoRA)",
        lambda c: f"{_f(c['heldout_loss'], 4)} ({_f(c['heldout_loss_ratio_to_plain'])})")
    row("member denoising loss", lambda c: _f(c["member_loss"], 4))
    styled = any(c.get("style_share_members") is not None for c in cols.values())
    if styled:
        row("**style share (LoRA's style) at members' captions**", lambda c: f"**{_p(c.get('style_share_members'))}**")
        row("**style share (LoRA's style) at unseen captions**", lambda c: f"**{_p(c.get('style_share_unseen'))}**")
        row("style gain over the base model (members' / unseen captions, points)",
            lambda c: "n/a" if c.get("style_gain_members") is None else
            f"{100 * c['style_gain_members']:+.1f} / {100 * c['style_gain_unseen']:+.1f}")
    else:
        row("classifier accuracy on samples", lambda c: _p(c["classifier_accuracy"]))
    row("Fréchet distance (classifier features)", lambda c: _f(c["frechet_distance"], 2))
    if styled:
        row("kernel distance (classifier features, KID-like)", lambda c: _f(c.get("kernel_distance"), 4))
    row("final adaptation loss (train)", lambda c: _f(c["adaptation_loss_last"], 4))
    sp = s["audit_splits"]
    lo, hi = s["null_band_auc95"]
    bq = s["base_model_quality"]
    dataset = s["config"].get("dataset", "digits")
    pw = s.get("power") or {}
    power = "" if not pw else (
        f" At this size an attack of AUC {pw['smallest_detectable_auc']:.3f} or more is detected with "
        f"{pw['power']:.0%} power (one-sided level {pw['alpha_one_sided']:g}); AUC "
        f"{pw['needed_per_side_for_auc']['target_auc']:g} needs {pw['needed_per_side_for_auc']['members']} "
        "members and as many non-members.")
    if bq.get("style_share_members") is None:
        base_utility, real = f"classifier accuracy {_p(bq['classifier_accuracy'])}", "public"
    else:
        base_utility = (f"{_p(bq['style_share_members'])} in the LoRA's style ({bq['target_style']}) at the members' "
                        f"captions, {_p(bq['style_share_unseen'])} at unseen captions")
        real = f"{bq['target_style']} classifier-pool"
    lines = [f"# smplora demo: plain LoRA vs SMP-LoRA on a tiny latent diffusion model ({dataset})", "",
             f"Audit: {sp.get('member_eval')} members / {sp.get('nonmember_eval')} non-members evaluated "
             f"(attacks tuned on {sp.get('member_calibration')} / {sp.get('nonmember_calibration')}); "
             f"one fixed attack at chance has AUC in [{lo:.3f}, {hi:.3f}] (95%).{power} Base model: {s['base']}; "
             f"its samples: {base_utility}, Fréchet distance {bq['frechet_distance']:.2f} (real {real} images, "
             f"same count: {bq['real_digits_frechet_distance']:.2f}).", ""] + rows
    refs = s.get("references")
    if refs:
        lines += ["", f"LiRA / RMIA: {refs['count']} {VARIANT_TITLES[s['config'].get('reference_variant', 'plain')]} "
                      f"reference LoRAs ({refs['mode']}), trained the target's way on "
                      f"random halves of the {refs.get('pool')} audited images; each image IN for "
                      f"{refs['in_per_sample_min_mean_max'][1]:g} of them."]
    warned: Dict[str, List[str]] = {}  # one line per distinct warning, naming the columns it concerns
    for c in cols.values():
        for w in c.get("warnings") or []:
            warned.setdefault(w, []).append(c["title"])
    if warned:
        lines += [""] + [f"**Warning ({', '.join(t)})**: {w}" for w, t in warned.items()]
    lines += ["", f"Verdict rule: {s['verdict_rule']}" if s.get("verdict_rule") else "Verdict rule: n/a",
              "", "The headline attack is chosen on the calibration split; the upper envelope is chosen on the "
                  "evaluation split, so judge it by its permutation null (q95), not by the chance band. "
                  "A 'no evidence' verdict is never a proof of privacy, and the epsilon lower bound is what this "
                  "audit refutes, not a "
                  "guarantee. TPR@1%FPR is conservative (largest threshold with FPR <= 1%). Details: "
                  "<out>/<column>/report.md, report.json, roc.png (base model: <out>/base/)."]
    return "\n".join(lines)
