"""Writing an audit report: report.json, report.md (one table) and a log-log ROC plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union


def _f(x: Optional[float], nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return _f(v, 4)
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    return "n/a" if v is None else str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _tuned(cal: Mapping[str, Any]) -> str:
    bits = []
    if "candidate" in cal:
        bits.append(str(cal["candidate"]))
    if "epoch" in cal:
        bits.append(f"epoch {cal['epoch']}")
    if "cv_folds" in cal:
        bits.append(f"{cal['cv_folds']}-fold")
    if str(cal.get("sign", "")).startswith("flipped"):
        bits.append("sign flipped")
    return ", ".join(bits) or "-"


def render_markdown(d: Mapping[str, Any]) -> str:
    """The report as Markdown: a headline, one table, the blind-baseline check, utility, details."""
    sp = d["splits"]
    lo, hi = d["null_band_auc95"]
    lines: List[str] = [f"# {d['title']}", ""]
    lines.append(
        f"Evaluation: {sp['member_eval']} members / {sp['nonmember_eval']} non-members "
        f"(calibration: {sp['member_calibration']} / {sp['nonmember_calibration']}). "
        f"AUC of a chance-level attack lies in [{lo:.3f}, {hi:.3f}] (95%)."
    )
    mx = d["max_over_attacks"]
    if mx.get("auc"):
        a = mx["auc"]
        lines += ["", f"**Strongest attack: {a['attack']}, AUC {a['value']:.3f} "
                      f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]; max leakage {_f(mx['leakage']['value'])}; "
                      f"max TPR@1%FPR {_pct((mx.get('tpr_at_1pct_fpr') or {}).get('value'))}; "
                      f"max TPR@0.1%FPR {_pct((mx.get('tpr_at_0.1pct_fpr') or {}).get('value'))}.**"]
    lines += ["", "| attack | AUC [95% CI] | leakage max(AUC,1-AUC) | TPR@1%FPR | TPR@0.1%FPR | "
                  "bal. acc. (threshold from calibration) | tuned on calibration |",
              "|---|---|---|---|---|---|---|"]
    blind = None
    for name, r in d["attacks"].items():
        if not r["uses_model"]:
            blind = (name, r)
        row = (f"| {_cell(r['title'])} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
               f"{r['leakage']:.3f} | {_pct(r['tpr_at_1pct_fpr'])} | {_pct(r['tpr_at_0.1pct_fpr'])} | "
               f"{_f(r['balanced_accuracy'])} | {_tuned(r['calibration'])} |")
        lines.append(row)
    if any(r["uses_model"] for r in d["attacks"].values()) and mx.get("auc"):
        lines.append(f"| **max over attacks** | **{mx['auc']['value']:.3f}** | **{_f(mx['leakage']['value'])}** | "
                     f"**{_pct((mx.get('tpr_at_1pct_fpr') or {}).get('value'))}** | "
                     f"**{_pct((mx.get('tpr_at_0.1pct_fpr') or {}).get('value'))}** | "
                     f"**{_f((mx.get('balanced_accuracy') or {}).get('value'))}** | |")
    lines.append("")
    lines.append("TPR at x% FPR is n/a when there are fewer than 1/x non-members. Leakage is two-sided: an "
                 "attack whose sign is fixed on calibration still counts if members look like 'anti-members'.")
    if blind is not None:
        _, r = blind
        ok = lo <= r["auc"] <= hi
        lines += ["", ("Blind baseline (no model access) is at chance: no sign of member/non-member split bias."
                       if ok else
                       f"**WARNING: the blind baseline (no model access) reaches AUC {r['auc']:.3f}, outside the "
                       "chance band: members and non-members differ in distribution, so every attack above is "
                       "inflated. Draw both from one pool.**")]
    util = d.get("utility") or {}
    if util:
        lines += ["", "## Utility", ""]
        for k, v in util.items():
            if k == "note":
                continue
            lines.append(f"- {k}: {_value(v)}")
        if "note" in util:
            lines.append(f"- ({util['note']})")
    lines += ["", "## For comparison with the SMP-LoRA paper only", "",
              "ASR picks its threshold on the evaluation set itself (optimistic); AUCn = |AUC - 0.5| / 0.5 hides "
              "the direction.", "", "| attack | TPR@5%FPR | ASR | AUCn |", "|---|---|---|---|"]
    for name, r in d["attacks"].items():
        pc = r["paper_comparison"]
        lines.append(f"| {_cell(r['title'])} | {_pct(pc['tpr_at_5pct_fpr'])} | {_pct(pc['asr_best_threshold_on_eval'])} | "
                     f"{pc['aucn']:.3f} |")
    curves = [(name, fam, c) for name, r in d["attacks"].items() for fam, c in (r.get("curves_eval_auc") or {}).items()]
    if curves:
        lines += ["", "## Per-timestep / per-variant AUC on the evaluation split (diagnostic, not selected on it)", ""]
        for name, fam, c in curves:
            lines.append(f"- {name} ({fam}): " + ", ".join(f"{k}: {v:.3f}" for k, v in c.items()))
    if d.get("info"):
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in d["info"].items()]
    lines += ["", f"Model passes per sample: " + ", ".join(f"{k} {v:g}" for k, v in d["model_passes_per_sample"].items())
              + f". Audit time {d['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def plot_roc(roc: Mapping[str, Sequence[Sequence[float]]], path: Union[str, Path], title: str = "ROC (log-log)",
             n_nonmember: Optional[int] = None) -> Path:
    """Log-log ROC curves, one per attack, with the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    floor = 1.0 / max(2, n_nonmember or 1000) / 2
    colours = plt.get_cmap("tab20").colors
    styles = ["-", "--", "-.", ":"]
    for i, (name, (fpr, tpr)) in enumerate(roc.items()):
        f, t = np.maximum(np.asarray(fpr), floor), np.maximum(np.asarray(tpr), floor)
        if name == "blind":
            ax.step(f, t, where="post", label="blind (no model)", color="0.5", linestyle=":", linewidth=1.2)
            continue
        ax.step(f, t, where="post", label=name, color=colours[(2 * i) % 20 + (i // 10) % 2],
                linestyle=styles[(i // 5) % len(styles)], linewidth=1.4)
    xs = np.logspace(np.log10(floor), 0, 50)
    ax.plot(xs, xs, "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_timestep_auc(attacks: Mapping[str, Mapping[str, Any]], path: Union[str, Path],
                      null_band: Optional[Sequence[float]] = None) -> Optional[Path]:
    """AUC on the evaluation split against the timestep, one line per per-timestep family."""
    series = []
    for name, r in attacks.items():
        for fam, c in (r.get("curves_eval_auc") or {}).items():
            pts = [(int(k[2:]), v) for k, v in c.items() if k.startswith("t=") and k[2:].isdigit()]
            if len(pts) >= 2:
                series.append((f"{name}" if fam == "per_timestep" else f"{name} ({fam})", sorted(pts)))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for label, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    if null_band is not None:
        ax.axhspan(null_band[0], null_band[1], color="0.85", label="chance band (95%)")
    ax.axhline(0.5, color="k", linewidth=0.6)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("AUC (evaluation split)")
    ax.set_ylim(0, 1)
    ax.set_title("Per-timestep AUC (diagnostic; t for the headline is chosen on calibration)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: Any, out_dir: Union[str, Path]) -> Dict[str, Path]:
    """Write report.json, report.md, roc.png (and per_timestep_auc.png) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = report.to_dict()
    paths = {"json": out / "report.json", "markdown": out / "report.md", "roc": out / "roc.png"}
    _atomic_write(paths["json"], json.dumps(d, indent=2, sort_keys=False, default=_json_default))
    _atomic_write(paths["markdown"], render_markdown(d))
    plot_roc(report.roc, paths["roc"], title=f"{report.title}\nROC on the evaluation split (log-log)",
             n_nonmember=report.splits.get("nonmember_eval"))
    pt = plot_timestep_auc(d["attacks"], out / "per_timestep_auc.png", d["null_band_auc95"])
    if pt is not None:
        paths["per_timestep"] = pt
    return paths


def _json_default(x: Any) -> Any:
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def side_by_side(reports: Mapping[str, Any], *, utility_keys: Optional[Sequence[str]] = None) -> str:
    """A Markdown table comparing several audits (e.g. ``{"plain LoRA": r1, "SMP-LoRA": r2}``).

    Rows: AUC [CI] per attack, then the maxima over attacks (AUC, leakage, TPR@1%/0.1% FPR) and
    the utility fields (all of them, or ``utility_keys``). Accepts :class:`AuditReport` objects or
    their ``to_dict()``.
    """
    ds = {name: (r.to_dict() if hasattr(r, "to_dict") else r) for name, r in reports.items()}
    names = list(ds)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    attacks: List[str] = []
    for d in ds.values():
        attacks += [a for a in d["attacks"] if a not in attacks]
    for a in attacks:
        cells = []
        for d in ds.values():
            r = d["attacks"].get(a)
            cells.append("-" if r is None else f"{r['auc']:.3f} [{r['auc_ci95'][0]:.2f}, {r['auc_ci95'][1]:.2f}]")
        title = next(d["attacks"][a]["title"] for d in ds.values() if a in d["attacks"])
        lines.append(f"| AUC {_cell(title)} | " + " | ".join(cells) + " |")
    for key, label, fmt in (("auc", "max AUC over attacks", _f), ("leakage", "max leakage", _f),
                            ("tpr_at_1pct_fpr", "max TPR@1%FPR", _pct), ("tpr_at_0.1pct_fpr", "max TPR@0.1%FPR", _pct),
                            ("balanced_accuracy", "max bal. acc. (calibrated threshold)", _f)):
        cells = []
        for d in ds.values():
            m = d["max_over_attacks"].get(key)
            cells.append("n/a" if not m else f"{fmt(m['value'])} ({m['attack']})")
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    keys: List[str] = list(utility_keys) if utility_keys is not None else []
    if utility_keys is None:
        for d in ds.values():
            keys += [k for k in (d.get("utility") or {}) if k != "note" and k not in keys]
    for k in keys:
        cells = []
        for d in ds.values():
            v = (d.get("utility") or {}).get(k)
            cells.append("-" if v is None else _value(v))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
