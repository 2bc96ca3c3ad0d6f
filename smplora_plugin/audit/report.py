"""Writing an audit report: report.json, report.md (verdict first, then one table), the ROC plot and exposure.png."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from smplora_plugin._io import atomic_write_text, fmt


def run_folder(index: int, name: str) -> str:
    """Sub-folder of a pooled report for run ``index`` (0-based): ``run_01_<name>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:40] or "run"
    return f"run_{index + 1:02d}_{slug}"


def _pct(x: Optional[float]) -> str:
    # not smplora_plugin._io.pct: that one rounds numpy scalars with numpy's round(), which differs from the
    # format's rounding on ties (0.0005 as np.float64 is 0.0% there, 0.1% here); the reports keep this one
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v, 4)
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


def _tpr_cell(r: Mapping[str, Any], key: str) -> str:
    lf = (r.get("low_fpr") or {}).get(key)
    if not lf or lf.get("tpr") is None:
        return "n/a"
    ci = lf.get("tpr_ci95")
    text = _pct(lf["tpr"]) + ("" if ci is None else f" [{_pct(ci[0])}, {_pct(ci[1])}]")
    return text + (" (low rel.)" if lf.get("low_reliability") else "")


def render_verdict(v: Optional[Mapping[str, Any]], training_dp: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The opening lines of report.md: the verdict in words and the evidence behind it; with ``training_dp`` (the
    LoRA's ``smplora.dp`` header, :mod:`.training_dp`) the training's DP epsilon beside the empirical lower bound."""
    if not v or v.get("verdict") is None:
        return ["**Verdict: none** (no model-using attack was run)."] + (
            ["", *render_training_dp(training_dp, None)] if training_dp else [])
    h, e, pw = v["headline"], v["upper_envelope"], v["power"]
    lines = [f"**Verdict: {v['verdict']}.**", ""]
    lines.append(f"- Headline attack (chosen on the calibration split): **{_cell(h['title'])}**, calibration AUC "
                 f"{h['calibration_auc']:.3f}; on the evaluation split AUC **{h['auc']:.3f}** "
                 f"[{h['auc_ci95'][0]:.3f}, {h['auc_ci95'][1]:.3f}], permutation p = {h['p_value']:.3g} (one-sided).")
    env = (f"- Upper envelope (maximum over attacks on the evaluation split: selected on it, optimistic): AUC "
           f"{e['auc']['value']:.3f} ({e['auc']['attack']}) against a null 95% quantile of {e['auc']['null_q95']:.3f}, "
           f"p = {e['auc']['p_value']:.3g}; leakage {e['leakage']['value']:.3f} (null q95 "
           f"{e['leakage']['null_q95']:.3f}, "
           f"p = {e['leakage']['p_value']:.3g})")
    t = e.get("tpr_at_1pct_fpr")
    if t:
        env += (f"; TPR@1%FPR {_pct(t['value'])} ({t['attack']}; null q95 {_pct(t['null_q95'])}, "
                f"p = {t['p_value']:.3g})")
    lines.append(env + f". {e['n_permutations']} label permutations.")
    lines.append(f"- Power: with {v['n_member']} members / {v['n_nonmember']} non-members this evaluation detects an "
                 f"AUC of {pw['smallest_detectable_auc']:.3f} or more with {pw['power']:.0%} power (one-sided "
                 f"{pw['alpha_one_sided']:g}). AUC {pw['needed_per_side_for_auc']['target_auc']:g} needs "
                 f"{pw['needed_per_side_for_auc']['members']} members and as many non-members; TPR "
                 f"{pw['needed_per_side_for_tpr']['target_tpr']:.0%} at {pw['needed_per_side_for_tpr']['at_fpr']:.0%} "
                 f"FPR needs {pw['needed_per_side_for_tpr']['members']} of each.")
    eps = v.get("epsilon_lower_bound")
    if eps:
        lines.append(f"- Empirical epsilon lower bound (a lower bound from this audit, **not a privacy guarantee**): "
                     f"eps >= {eps['epsilon']:.2f} at delta = 0 ({eps['epsilon_at_delta']:.2f} at delta = "
                     f"{eps['delta']:g}); {h['attack']} at a threshold fixed on calibration: {eps['tp']} members and "
                     f"{eps['fp']} non-members above it, TPR >= {eps['tpr_lower']:.3f}, FPR <= {eps['fpr_upper']:.3f} "
                     "(one-sided 95% Clopper-Pearson each).")
    lines += render_training_dp(training_dp, eps)
    sh = v.get("shift_check")
    if sh:
        lines.append(f"- Shift check: loss AUC {sh['loss_auc']:.3f} [{sh['loss_auc_ci95'][0]:.3f}, "
                     f"{sh['loss_auc_ci95'][1]:.3f}] beside base-calibrated loss {sh['loss_calibrated_auc']:.3f} "
                     f"[{sh['loss_calibrated_auc_ci95'][0]:.3f}, {sh['loss_calibrated_auc_ci95'][1]:.3f}].")
    for w in v.get("warnings") or []:
        lines.append(f"- **WARNING: {w}**")
    lines += ["", f"Rule: {v['rule']}"]
    return lines


DP_KEY = "smplora.dp"  # the header entry of a LoRA trained with DP noise (read by .training_dp)
LOWER_BOUND_LABEL = "what the attacks refute, a lower bound (not a guarantee)"


def training_dp_line(block: Mapping[str, Any]) -> str:
    """One sentence: the training's epsilon at its delta, with the accountant and sampling assumption."""
    text = (f"Training DP epsilon (from the LoRA's {DP_KEY} header; {block['label']}): epsilon "
            f"{block['epsilon']:.4g} at delta {block['delta']:.3g}, {block['accountant']} accountant")
    extra = [f"{k} {block[k]:g}" for k in ("sigma", "clip") if isinstance(block.get(k), (int, float))]
    if isinstance(block.get("steps"), int):
        extra.append(f"{block['steps']} steps")
    if extra:
        text += ", " + ", ".join(extra)
    text += "."
    if block.get("caveat"):
        text += f" {block['caveat']}"
    return text


def render_training_dp(block: Optional[Mapping[str, Any]], empirical: Optional[Mapping[str, Any]]) -> List[str]:
    """report.md lines that set the training's epsilon beside the audit's lower bound (nothing without a block)."""
    if not block:
        return []
    if "runs" in block:
        lines = [f"- Training DP epsilon per run (from each LoRA's {DP_KEY} header, "
                 "each labelled with the sampling its accountant assumed):"]
        for b in block["runs"]:
            lines.append(f"  - {b['run']}: " + training_dp_line(b))
        if block.get("runs_without"):
            lines.append(f"  - no {DP_KEY} entry: " + ", ".join(block["runs_without"]))
        return lines
    lines = ["- " + training_dp_line(block)]
    if empirical:
        lines.append(f"  Beside it, the audit's empirical epsilon >= {empirical['epsilon']:.2f} at delta = 0 "
                     f"({empirical['epsilon_at_delta']:.2f} at delta = {empirical['delta']:g}) is "
                     f"{LOWER_BOUND_LABEL}. A lower bound below the training epsilon is expected; one above it (at a "
                     "comparable delta) would contradict the guarantee: check the accounting and the sampling.")
    return lines


EXPOSURE_FILE = "exposure.png"
_SPACE = {"pixels": "pixel", "latents": "latent"}  # the exposure block's distance space, as an adjective


def render_exposure(block: Optional[Mapping[str, Any]]) -> List[str]:
    """report.md's "Exposure" section from report.json's ``exposure`` block (nothing without one)."""
    if not block:
        return []
    lines = ["", "## Exposure: the most exposed members", ""]
    if "runs" in block:
        lines.append("Ranked per run: each member against the non-members of its own run (the LoRA that trained "
                     f"on it); each run's report.md and {EXPOSURE_FILE} hold its ranking.")
        lines += ["", "| run | most exposed member | rank among non-members | near-copy |", "|---|---|---|---|"]
        for r in block["runs"]:
            m = r.get("most_exposed")
            lines.append(f"| {_cell(r['run'])} | n/a | | |" if m is None else
                         f"| {_cell(r['run'])} | `{_cell(m['id'])}` | {m['rank_text']} | {_flag(m)} |")
        return lines
    top = block["members"][:block["top_k"]]
    lines.append(f"The {len(top)} of {len(block['members'])} evaluation members that the headline attack, "
                 f"**{_cell(block['title'])}** (`{block['attack']}`), scores most member-like. Rank among non-members: "
                 f"the share of the {block['n_nonmember']} evaluation non-members that score lower (ties count half; "
                 "its mean over all members is the attack's AUC). Calibrated score: the score standardised with the "
                 "calibration non-members' mean and standard deviation (0 = a typical non-member). Calibration "
                 "members are not ranked: they chose the attack.")
    lines += ["", "| # | file | calibrated score | rank among non-members | nearest generated (MSE) | near-copy |",
              "|---|---|---|---|---|---|"]
    for m in top:
        dist = "n/a" if m["distance"] is None else f"{m['distance']:.4g}"
        lines.append(f"| {m['rank']} | `{_cell(m['id'])}` | {m['calibrated_score']:+.2f} | {m['rank_text']} | {dist} "
                     f"| {_flag(m)} |")
    lines.append("")
    if block["threshold"] is not None:
        lines.append(f"Near-copy flag (a heuristic, not a proof of copying): the mean squared "
                     f"{_SPACE.get(block['distance_space'], block['distance_space'])} difference to the nearest of "
                     "the LoRA's "
                     f"{block['generated_per_caption']} samples generated at the member's caption is below "
                     f"{block['threshold']:.4g}, the {100 * block['quantile']:g}% quantile (lower) of the same "
                     f"distance over the {block['n_calibration_nonmember']} calibration non-members. At this threshold "
                     f"**{block['nonmembers_flagged']} of {block['n_nonmember']} evaluation non-members are flagged "
                     f"({_pct(block['nonmember_flag_share'])})**, and {block['members_flagged']} of "
                     f"{len(block['members'])} evaluation members. `{EXPOSURE_FILE}` shows each member beside its "
                     "nearest generated sample.")
    else:
        lines.append(f"No near-copy check: {block['no_distance_reason']}. `{EXPOSURE_FILE}` shows the members with "
                     "their ranks only.")
    return lines


def _flag(m: Mapping[str, Any]) -> str:
    return "n/a" if m.get("near_copy") is None else ("**NEAR-COPY**" if m["near_copy"] else "no")


def render_markdown(d: Mapping[str, Any]) -> str:
    """The report as Markdown: the verdict, one table, the blind-baseline check, utility, details, runs."""
    sp = d["splits"]
    lo, hi = d["null_band_auc95"]
    lines: List[str] = [f"# {d['title']}", ""]
    lines += render_verdict(d.get("verdict"), d.get("training_dp"))
    if d.get("pooling"):
        pl = d["pooling"]
        lines += ["", f"Pooled over {pl['n_runs']} runs: {pl['method']}.", "", "| run | verdict | headline attack | "
                  "AUC | p |", "|---|---|---|---|---|"]
        for r in (d.get("verdict") or {}).get("per_run", []):
            lines.append(f"| {_cell(r['run'])} | {r['verdict']} | {r['headline']} | {fmt(r['headline_auc'])} | "
                         f"{'n/a' if r['headline_p_value'] is None else format(r['headline_p_value'], '.3g')} |")
    lines += ["", f"Evaluation: {sp['member_eval']} members / {sp['nonmember_eval']} non-members "
                  f"(calibration: {sp['member_calibration']} / {sp['nonmember_calibration']}). "
                  f"AUC of one fixed chance-level attack lies in [{lo:.3f}, {hi:.3f}] (95%)."]
    mx = d["max_over_attacks"]
    lines += ["", "| attack | AUC [95% CI] | calibration AUC | leakage max(AUC,1-AUC) | TPR@1%FPR [95% CI] | "
                  "TPR@0.1%FPR [95% CI] | bal. acc. (threshold from calibration) | tuned on calibration |",
              "|---|---|---|---|---|---|---|---|"]
    blind = None
    for name, r in d["attacks"].items():
        if not r["uses_model"]:
            blind = (name, r)
        cal_auc = (r.get("calibration") or {}).get("calibration_auc")
        row = (f"| {_cell(r['title'])} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
               f"{fmt(cal_auc)} | {r['leakage']:.3f} | {_tpr_cell(r, '1%')} | {_tpr_cell(r, '0.1%')} | "
               f"{fmt(r['balanced_accuracy'])} | {_tuned(r['calibration'])} |")
        lines.append(row)
    if any(r["uses_model"] for r in d["attacks"].values()) and mx.get("auc"):
        lines.append(f"| *upper envelope (max over attacks, selected on evaluation)* | *{mx['auc']['value']:.3f}* | | "
                     f"*{fmt(mx['leakage']['value'])}* | *{_pct((mx.get('tpr_at_1pct_fpr') or {}).get('value'))}* | "
                     f"*{_pct((mx.get('tpr_at_0.1pct_fpr') or {}).get('value'))}* | "
                     f"*{fmt((mx.get('balanced_accuracy') or {}).get('value'))}* | |")
    lines.append("")
    first = next(iter(d["attacks"].values()), None)
    fp_note = ""
    if first and first.get("low_fpr"):
        fp_note = " The threshold at 1% FPR admits {} false positive(s), at 0.1% FPR {}.".format(
            first["low_fpr"]["1%"]["false_positives_allowed"], first["low_fpr"]["0.1%"]["false_positives_allowed"])
    lines.append("TPR at x% FPR is conservative (largest TPR with FPR <= x), n/a with fewer than 1/x non-members, and "
                 "marked (low rel.) with fewer than 10/x." + fp_note + " Leakage is two-sided: an attack whose sign is "
                 "fixed on calibration still counts if members look like 'anti-members'.")
    if blind is not None:
        _, r = blind
        ok = r["auc_ci95"][0] <= 0.5 <= r["auc_ci95"][1]
        lines += ["", ("Blind baseline (no model access): its AUC CI contains 0.5, no sign of member/non-member split "
                       "bias." if ok else
                       f"**WARNING: the blind baseline (no model access) reaches AUC {r['auc']:.3f}, CI "
                       f"[{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] excludes 0.5: members and non-members differ "
                       "in distribution, so every attack above may be inflated. Draw both from one pool.**")]
    lines += render_exposure(d.get("exposure"))
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
    for r in d["attacks"].values():
        pc = r["paper_comparison"]
        lines.append(f"| {_cell(r['title'])} | {_pct(pc['tpr_at_5pct_fpr'])} | "
                     f"{_pct(pc['asr_best_threshold_on_eval'])} | {pc['aucn']:.3f} |")
    curves = [(name, fam, c) for name, r in d["attacks"].items() for fam, c in (r.get("curves_eval_auc") or {}).items()]
    if curves:
        lines += ["", "## Per-timestep / per-variant AUC on the evaluation split (diagnostic, not selected on it)", ""]
        for name, fam, c in curves:
            lines.append(f"- {name} ({fam}): " + ", ".join(f"{k}: {v:.3f}" for k, v in c.items()))
    if d.get("info"):
        lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in d["info"].items()]
    lines += ["", "Model passes per sample: " + ", ".join(f"{k} {v:g}" for k, v in d["model_passes_per_sample"].items())
              + f". Audit time {d['seconds']:.1f} s."]
    names = (d.get("pooling") or {}).get("runs") or []
    for i, run in enumerate(d.get("runs") or []):
        v = run.get("verdict") or {}
        lines += ["", f"## Run {i + 1}: {_cell(run['title'])}", ""]
        if i < len(names):
            lines.append(f"Full report: `{run_folder(i, names[i])}/report.md`.")
            lines.append("")
        lines.append(v.get("summary") or "no verdict.")
        for w in v.get("warnings") or []:
            lines.append(f"- **WARNING: {w}**")
        lines.append("")
        lines.append("| attack | AUC [95% CI] | TPR@1%FPR |")
        lines.append("|---|---|---|")
        for r in run["attacks"].values():
            lines.append(f"| {_cell(r['title'])} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
                         f"{_pct(r['tpr_at_1pct_fpr'])} |")
    return "\n".join(lines) + "\n"


def plot_roc(roc: Mapping[str, Sequence[Sequence[float]]], path: Union[str, Path], title: str = "ROC",
             n_nonmember: Optional[int] = None, aucs: Optional[Mapping[str, float]] = None,
             headline: Optional[str] = None) -> Path:
    """ROC curves, one per attack: linear axes, and log-log axes down to FPR = 1 / n_nonmember.

    The legend (attack and AUC) sits to the right of the panels. The log-log panel, where low-FPR
    behaviour is read, is drawn only when at least 10 non-members make the region below 10%
    FPR resolvable; its axis stops at the smallest resolvable FPR, 1 / n_nonmember.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n0 = n_nonmember or max((len(f) for f, _ in roc.values()), default=2)
    log_panel = n0 >= 10
    fig, axes = plt.subplots(1, 2 if log_panel else 1, figsize=(10.5 if log_panel else 7, 4.6), dpi=120, squeeze=False)
    axes = axes[0]
    floor = 1.0 / n0
    colours = plt.get_cmap("tab20").colors
    styles = ["-", "--", "-.", ":"]
    for i, (name, (fpr, tpr)) in enumerate(roc.items()):
        label = name + ("" if not aucs or name not in aucs else f" (AUC {aucs[name]:.3f})")
        if name == headline:
            label += " [headline]"
        if name == "blind":
            kw = dict(color="0.5", linestyle=":", linewidth=1.2)
            label = label.replace("blind", "blind, no model", 1)
        else:
            kw = dict(color=colours[(2 * i) % 20 + (i // 10) % 2], linestyle=styles[(i // 5) % len(styles)],
                      linewidth=2.2 if name == headline else 1.3)
        f, t = np.asarray(fpr), np.asarray(tpr)
        axes[0].step(f, t, where="post", label=label, **kw)
        if log_panel:
            axes[1].step(np.maximum(f, floor), np.maximum(t, floor), where="post", **kw)
    axes[0].plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title("linear", fontsize=9)
    if log_panel:
        xs = np.logspace(np.log10(floor), 0, 50)
        axes[1].plot(xs, xs, "k--", linewidth=0.8)
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlim(floor, 1)
        axes[1].set_ylim(floor, 1.05)
        axes[1].set_title(f"log-log, down to FPR = 1/{n0} (the smallest resolvable)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
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
    """Write report.json, report.md, roc.png (and per_timestep_auc.png, exposure.png) into ``out_dir``.

    ``exposure.png`` is drawn by the report's exposure ranking (``report.exposure.plot``, see
    :mod:`.exposure`) when it has one: single-run reports with a headline attack.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = report.to_dict()
    paths = {"json": out / "report.json", "markdown": out / "report.md", "roc": out / "roc.png"}
    atomic_write_text(paths["json"], json.dumps(d, indent=2, sort_keys=False, default=_json_default))
    atomic_write_text(paths["markdown"], render_markdown(d))
    head = ((d.get("verdict") or {}).get("headline") or {}).get("attack")
    plot_roc(report.roc, paths["roc"], title=f"{report.title}\nROC on the evaluation split",
             n_nonmember=report.splits.get("nonmember_eval"), aucs={k: r["auc"] for k, r in d["attacks"].items()},
             headline=head)
    pt = plot_timestep_auc(d["attacks"], out / "per_timestep_auc.png", d["null_band_auc95"])
    if pt is not None:
        paths["per_timestep"] = pt
    exposure = getattr(report, "exposure", None)
    if exposure is not None and hasattr(exposure, "plot"):
        paths["exposure"] = exposure.plot(out / EXPOSURE_FILE, report)
    return paths


def _json_default(x: Any) -> Any:
    """numpy scalars and arrays as Python values; anything else is a bug in ``to_dict()``, so a TypeError
    (what ``json`` expects from its ``default`` hook), not a :class:`SmploraError` that reads as user error."""
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot serialise {type(x).__name__}")


def side_by_side(reports: Mapping[str, Any], *, utility_keys: Optional[Sequence[str]] = None) -> str:
    """A Markdown table comparing several audits (e.g. ``{"plain LoRA": r1, "SMP-LoRA": r2}``).

    Rows: the verdict, the headline AUC and the epsilon lower bound (reports with a verdict), AUC
    [CI] per attack, then the upper envelope (maxima over attacks: AUC, leakage, TPR@1%/0.1% FPR) and
    the utility fields (all of them, or ``utility_keys``). Accepts :class:`AuditReport` objects or
    their ``to_dict()``.
    """
    ds = {name: (r.to_dict() if hasattr(r, "to_dict") else r) for name, r in reports.items()}
    names = list(ds)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    verdicts = [d.get("verdict") or {} for d in ds.values()]
    if any(v.get("verdict") for v in verdicts):
        lines.append("| **verdict** | " + " | ".join(f"**{v.get('verdict') or 'n/a'}**" for v in verdicts) + " |")
        cells = []
        for v in verdicts:
            h = v.get("headline")
            cells.append("n/a" if not h else f"{h['auc']:.3f} [{h['auc_ci95'][0]:.2f}, {h['auc_ci95'][1]:.2f}] "
                                             f"({h['attack']}, p = {h['p_value']:.3g})")
        lines.append("| headline AUC (attack chosen on calibration) | " + " | ".join(cells) + " |")
        cells = [("n/a" if not v.get("epsilon_lower_bound") else f"{v['epsilon_lower_bound']['epsilon']:.2f}")
                 for v in verdicts]
        lines.append("| empirical epsilon lower bound (not a guarantee) | " + " | ".join(cells) + " |")
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
    for key, label, show in (("auc", "max AUC over attacks (upper envelope)", fmt), ("leakage", "max leakage", fmt),
                             ("tpr_at_1pct_fpr", "max TPR@1%FPR", _pct), ("tpr_at_0.1pct_fpr", "max TPR@0.1%FPR", _pct),
                             ("balanced_accuracy", "max bal. acc. (calibrated threshold)", fmt)):
        cells = []
        for d in ds.values():
            m = d["max_over_attacks"].get(key)
            cells.append("n/a" if not m else f"{show(m['value'])} ({m['attack']})")
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
