"""Plain types of the audit: :class:`AuditError`, :class:`AuditSamples` and :class:`AuditReport`.

This module sits at the bottom of the audit's imports: it imports no other audit module except
:mod:`.report`, which only renders (and imports no audit module itself).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import SmploraError
from ..holdout import write_manifest
from .report import render_markdown, run_folder, write_report

if TYPE_CHECKING:  # annotations only
    from .verdict import AttackScores


class AuditError(SmploraError):
    """Bad input to the audit (files, images, manifests, sample counts, model folders)."""


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
    """``x`` as :class:`AuditSamples` (an image tensor, or ``(images, captions)``, are accepted)."""
    if isinstance(x, AuditSamples):
        return x
    if isinstance(x, torch.Tensor):
        return AuditSamples(x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], torch.Tensor):
        return AuditSamples(x[0], list(x[1]))
    raise AuditError(f"{what} must be AuditSamples, an image tensor, or (images, captions); got {type(x).__name__}.")


@dataclass
class AuditReport:
    """Result of :func:`~.protocol.run_audit`; ``to_dict()`` is the content of report.json."""

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
    scores: Optional[Dict[str, "AttackScores"]] = field(default=None, repr=False)  # kept for pooling, not serialised
    eval_labels: Optional[np.ndarray] = field(default=None, repr=False)
    runs: Optional[List["AuditReport"]] = field(default=None, repr=False)  # pooled report: the per-run reports
    pooling: Optional[Dict[str, Any]] = None
    # the generation attack's nearest generated samples (attacks.generation.NearestGenerated), for exposure.png
    generated: Optional[Any] = field(default=None, repr=False, compare=False)
    # the members ranked by exposure (exposure.Exposure, or exposure.PooledExposure), set by exposure.attach_exposure
    exposure: Optional[Any] = field(default=None, repr=False, compare=False)
    # the training's DP epsilon from the LoRA's smplora.dp header entry (training_dp.read_training_dp), if any
    training_dp: Optional[Dict[str, Any]] = None

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
        if self.training_dp is not None:
            d["training_dp"] = self.training_dp
        if self.exposure is not None:
            d["exposure"] = self.exposure.to_dict()
        if self.pooling is not None:
            d["pooling"] = self.pooling
        if self.runs is not None:
            d["runs"] = [r.to_dict() for r in self.runs]
        return d

    def markdown(self) -> str:
        return render_markdown(self.to_dict())

    def write(self, out_dir: Union[str, Path]) -> Dict[str, Path]:
        """Write report.json, report.md, roc.png, per_timestep_auc.png, exposure.png, manifest.json to ``out_dir``."""
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
