"""The training's formal DP epsilon, read from the audited LoRA's ``smplora.dp`` header entry.

A LoRA trained with DP noise (:class:`~smplora_plugin.dp.DPGradients`) carries ``smplora.dp``: the JSON of
``privacy_spent()`` (epsilon, delta, sigma, clip, steps, accountant, sampling and its assumption in words).
The audit shows it beside its own empirical epsilon lower bound, each labelled for what it is: the training's
epsilon is a formal guarantee computed by the accountant under the stated sampling; the audit's is what the
attacks refute, a lower bound. A LoRA without the entry gets no ``training_dp`` block. The block is rendered
by :mod:`.report` (:func:`render_training_dp`, re-exported here).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .report import DP_KEY, LOWER_BOUND_LABEL, render_training_dp, training_dp_line

GUARANTEE_LABEL = "a formal guarantee computed by the accountant under {sampling}"
NOT_COVERED_LABEL = ("computed by the {accountant} accountant as if batches were Poisson-sampled{q}; the run's "
                     "'{sampling}' batches do not satisfy that assumption, so it is not a formal guarantee for "
                     "this run")
_REQUIRED = ("epsilon", "delta", "accountant", "sampling")


def training_dp_from_entries(entries: Mapping[str, str], source: str = "the LoRA") -> Optional[Dict[str, Any]]:
    """The ``training_dp`` block of a report from ``smplora.*`` header entries (``None`` without ``smplora.dp``).

    Raises :class:`AuditError` when the entry is present but is not what :meth:`DPGradients.file_metadata`
    writes (not JSON, or without epsilon, delta, accountant and sampling).
    """
    from .types import AuditError

    raw = entries.get(DP_KEY)
    if raw is None:
        return None
    fix = (f"re-save {source} with the trainer that wrote it, or remove the {DP_KEY} header entry if the LoRA was "
           "not trained with DP noise")
    try:
        d = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"the {DP_KEY} header entry of {source} is not JSON ({exc}): {fix}.") from exc
    if not isinstance(d, dict):
        raise AuditError(f"the {DP_KEY} header entry of {source} is a {type(d).__name__}, not a JSON object: {fix}.")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise AuditError(f"the {DP_KEY} header entry of {source} lacks {', '.join(missing)}: {fix}.")
    try:
        eps, delta = float(d["epsilon"]), float(d["delta"])
    except (TypeError, ValueError) as exc:
        raise AuditError(f"the {DP_KEY} header entry of {source} has a non-numeric epsilon or delta: {fix}.") from exc
    if math.isnan(eps) or eps < 0 or not 0 <= delta < 1:
        raise AuditError(f"the {DP_KEY} header entry of {source} has epsilon {eps} and delta {delta}: epsilon must be "
                         f">= 0 and delta in [0, 1); {fix}.")
    sampling, accountant, rate = str(d["sampling"]), str(d["accountant"]), d.get("sample_rate")
    q = f" at q = {rate:.6g}" if isinstance(rate, (int, float)) and not isinstance(rate, bool) else ""
    poisson = sampling == "poisson"
    label = (GUARANTEE_LABEL.format(sampling=f"Poisson sampling{q}") if poisson else
             NOT_COVERED_LABEL.format(accountant=accountant, q=q, sampling=sampling))
    out: Dict[str, Any] = {
        "epsilon": eps, "delta": delta, "accountant": accountant, "sampling": sampling,
        "sampling_assumption": str(d.get("assumption") or label), "poisson": poisson, "label": label,
        "empirical_label": LOWER_BOUND_LABEL,
        "source": source,
    }
    for k in ("sigma", "clip", "steps", "sample_rate", "expected_batch_size", "dataset_size", "objective",
              "target_epsilon", "planned_steps", "caveat"):
        if d.get(k) is not None:
            out[k] = d[k]
    return out


def read_training_dp(lora_file: Union[str, "os.PathLike[str]"]) -> Optional[Dict[str, Any]]:
    """The ``training_dp`` block from the header of ``lora_file`` (``None`` when it has no ``smplora.dp``)."""
    from ..errors import SmploraError
    from ..metadata import read_privacy_metadata
    from .types import AuditError

    try:
        entries = read_privacy_metadata(lora_file)
    except SmploraError as exc:
        raise AuditError(f"cannot read the header of the audited LoRA: {exc}") from exc
    return training_dp_from_entries(entries, source=os.fspath(lora_file))


def pooled_training_dp(blocks: Sequence[Optional[Mapping[str, Any]]], names: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The pooled report's block: each run's ``training_dp`` by name (``None`` when no run has one)."""
    runs: List[Dict[str, Any]] = [{"run": n, **dict(b)} for n, b in zip(names, blocks) if b is not None]
    if not runs:
        return None
    return {"runs": runs, "runs_without": [n for n, b in zip(names, blocks) if b is None]}


__all__ = ["DP_KEY", "GUARANTEE_LABEL", "LOWER_BOUND_LABEL", "NOT_COVERED_LABEL", "pooled_training_dp",
           "read_training_dp", "render_training_dp", "training_dp_from_entries", "training_dp_line"]
