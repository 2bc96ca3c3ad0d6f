"""The audit report as node text: the verdict when the report has one, else the max-attack headline."""

from __future__ import annotations

from typing import Any, Dict


def _verdict_text(verdict: Any) -> str:
    if isinstance(verdict, str):
        return verdict
    if isinstance(verdict, dict):
        for key in ("text", "summary", "message", "label"):
            if isinstance(verdict.get(key), str):
                return verdict[key]
        return "; ".join(f"{k}: {v}" for k, v in verdict.items())
    return str(verdict)


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
    """Verdict (or headline) followed by the report's Markdown table."""
    d = report.to_dict()
    first = f"Verdict: {_verdict_text(d['verdict'])}" if "verdict" in d else headline(d)
    return first + "\n\n" + report.markdown()
