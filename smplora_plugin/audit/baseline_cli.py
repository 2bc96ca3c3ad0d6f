"""``smplora audit --baseline``: the same audit of the base model, and the paired test against it.

The base model is the audited target with its LoRA switched off (:class:`BaseModelTarget`): it
scores the same samples, with the same split, seed and noise draws, so
:func:`~.paired.compare_to_baseline` can test "leakage beyond the base model" on the AUC
differences. Works for one LoRA and for pooled runs (each run against its own base view).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from .target import CAPABILITIES, AuditError, missing_capabilities

BASE_FOLDER = "base_model"  # the base model's own report, under --out
_GRADIENT_METHODS = frozenset(CAPABILITIES["gradients"])


class BaseModelTarget:
    """An :class:`~.target.AuditTarget` view of ``target`` with its adapter always off.

    ``eps(..., adapter=True)`` and ``eps(..., adapter=False)`` both query the base model, like a
    LoRA that was never trained. Everything else is the wrapped target's, except the
    ``"gradients"`` capability (there are no trained LoRA parameters to differentiate).
    """

    def __init__(self, target: Any):
        self._inner = target

    def eps(self, z_t, t, cond, *, adapter: bool = True):
        return self._inner.eps(z_t, t, cond, adapter=False)

    def __getattr__(self, name: str) -> Any:
        if name in _GRADIENT_METHODS or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


def base_attacks(report: Any, base_target: Any) -> List[str]:
    """The attacks of ``report`` that the base model can run (gradient attacks cannot)."""
    from .attacks import available_attacks

    reg = available_attacks()
    return [a for a in report.attacks if a in reg
            and not missing_capabilities(base_target, getattr(reg[a](), "requires", ()))]


def paired_block(report: Any, base: Any, *, n_permutations: int, seed: int) -> Dict[str, Any]:
    """:func:`~.paired.compare_to_baseline` of the LoRA's report against the base model's, for report.json."""
    from .paired import BEYOND, compare_to_baseline

    c = compare_to_baseline(report, base, n_permutations=n_permutations, seed=seed)
    c["beyond_base_model"] = c["verdict"] == BEYOND
    c["baseline"] = "the base model (the same target with the LoRA switched off) on the same samples"
    c["base_model_report"] = f"{BASE_FOLDER}/report.md"
    return c


def one_line(c: Dict[str, Any]) -> str:
    """``Beyond the base model: yes/no (p = ..., attack)``: the smaller of the two paired p-values."""
    if c.get("headline") is None:
        return (f"**Beyond the base model: no** ({c.get('summary', 'no attack separates the two models')}) "
                f"[paired test, {BASE_FOLDER}/report.md].")
    p = c["p_values"]
    which = "headline" if p["headline"] <= p["envelope"] else "envelope"
    attack = c[which]["attack"]
    word = "yes" if c["beyond_base_model"] else "no"
    return (f"**Beyond the base model: {word}** (p = {p[which]:.3g}, {attack}; paired AUC difference "
            f"{c[which]['difference']:+.3f} against the same audit of the base model, level {p['level_each']:g} "
            f"per test, {p['null']}) [{BASE_FOLDER}/report.md].")


def attach(report: Any, c: Dict[str, Any]) -> None:
    """Put the paired result in the report's verdict block (report.json)."""
    report.verdict = {**(report.verdict or {}), "beyond_base_model": {"line": one_line(c), **c}}


def write_with_baseline(report: Any, base: Any, out_dir: str) -> None:
    """Write both reports; report.md gets the paired line right after the verdict."""
    out = Path(out_dir)
    report.write(out)
    base.write(out / BASE_FOLDER)
    md = out / "report.md"
    line = report.verdict["beyond_base_model"]["line"]
    lines = md.read_text().splitlines()
    at = next((i + 1 for i, s in enumerate(lines) if s.startswith("**Verdict")), min(2, len(lines)))
    lines[at:at] = ["", line]
    md.write_text("\n".join(lines) + "\n")


def check_baseline_args(args: Any) -> None:
    """Cheap checks of ``--baseline`` before any model work."""
    if not getattr(args, "baseline", False):
        return
    if getattr(args, "attacks", None):
        names = [a.strip() for a in args.attacks.split(",") if a.strip()]
        if names and all(n == "blind" for n in names):
            raise AuditError("--baseline compares model-using attacks; --attacks blind uses no model: add a model "
                             "attack (e.g. loss) or drop --baseline.")


def audit_base(run_one, report: Any, target_wrapped: Any) -> Any:
    """``run_one(attacks)``: the base model's report on the report's attacks that it can run (else an error)."""
    names = base_attacks(report, target_wrapped)
    if not names:
        raise AuditError("none of the audited attacks can run on the base model (gradient attacks need the LoRA); "
                         "add a loss-based attack (e.g. --attacks loss,secmi,...) or drop --baseline.")
    return run_one(names)
