"""The audit report as node text: the verdict summary (or the max-attack headline when no verdict was reached),
the paired test against the base model when it ran, then the report."""

from __future__ import annotations

from typing import Any, Dict, Optional


def headline(d: Dict[str, Any]) -> str:
    """One line from ``max_over_attacks``: AUC with its CI and attack, TPR at 1% FPR, the chance band."""
    top = d.get("max_over_attacks") or {}
    auc = top.get("auc") or {}
    parts = []
    if "value" in auc:
        ci = auc.get("ci95")
        ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
        parts.append(f"max-attack AUC {auc['value']:.3f}{ci_text} ({auc.get('attack', '?')})")
    tpr = top.get("tpr_at_1pct_fpr")
    if isinstance(tpr, dict) and "value" in tpr:
        parts.append(f"TPR at 1% FPR {100 * tpr['value']:.1f}%")
    band = d.get("null_band_auc95")
    if isinstance(band, (list, tuple)) and len(band) == 2:
        parts.append(f"chance band for AUC [{band[0]:.2f}, {band[1]:.2f}]")
    return "; ".join(parts) if parts else "no attack result"


def beyond_base_line(d: Dict[str, Any]) -> Optional[str]:
    """"Beyond the base model: yes/no (p = ..., attack; ...)" when the report holds the paired test, else None."""
    b = (d.get("verdict") or {}).get("beyond_base_model")
    if not isinstance(b, dict) or not b.get("line"):
        return None
    return str(b["line"]).replace("**", "")  # the report.md line without its Markdown emphasis


def training_dp_text(d: Dict[str, Any]) -> Optional[str]:
    """The training's DP epsilon (the LoRA's ``smplora.dp`` header) beside the audit's lower bound, else None."""
    from smplora_plugin.audit.training_dp import render_training_dp

    block = d.get("training_dp")
    if not block:
        return None
    eps = (d.get("verdict") or {}).get("epsilon_lower_bound")
    return "\n".join(line.lstrip("- ").strip() for line in render_training_dp(block, eps))


def report_text(report: Any) -> str:
    """The audit's verdict summary (``report.verdict["summary"]``, "Verdict: ..."), then the Markdown table.

    A report without a verdict (no model-using attack ran) falls back to the max-attack headline. With the
    baseline option, the line "Beyond the base model: yes/no (p, attack)" follows the verdict; for a LoRA trained
    with DP noise, the training's epsilon (a formal guarantee) beside the audit's empirical lower bound.
    """
    d = report.to_dict()
    v = d.get("verdict")
    first = v["summary"] if isinstance(v, dict) and v.get("verdict") and v.get("summary") else headline(d)
    beyond = beyond_base_line(d)
    if beyond is not None:
        first += "\n" + beyond
    dp = training_dp_text(d)
    if dp is not None:
        first += "\n" + dp
    return first + "\n\n" + report.markdown()
