"""The audit report as node text: the verdict summary, or the max-attack headline when no verdict was reached."""

from __future__ import annotations

from typing import Any, Dict


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


def report_text(report: Any) -> str:
    """The audit's verdict summary (``report.verdict["summary"]``, "Verdict: ..."), then the Markdown table.

    A report without a verdict (no model-using attack ran) falls back to the max-attack headline.
    """
    d = report.to_dict()
    v = d.get("verdict")
    first = v["summary"] if isinstance(v, dict) and v.get("verdict") and v.get("summary") else headline(d)
    return first + "\n\n" + report.markdown()
