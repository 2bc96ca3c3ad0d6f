"""Reference models for LiRA and RMIA: LoRAs trained the audited way on population data.

A :class:`References` holds reference :class:`~.target.AuditTarget` s and, for each, the
identities of the samples it trained on. Identities are those of
:meth:`~.types.AuditSamples.identity` (explicit ids, or ``sha256:`` of the pixels); an audited
sample counts as IN for a reference when its explicit id *or* its pixel hash is in that
reference's training set, so a reference manifest may name files by path or by content.

Constructors:

- :meth:`References.from_targets` - targets you already have, with their training ids;
- :meth:`References.train` - a trainer callback ``trainer(train_samples, seed) -> AuditTarget``
  run on random halves of a population pool (each pool sample is IN for exactly half of the
  references, the balanced design of Carlini et al. 2022);
- :meth:`References.from_lora_files` - LoRA files against a diffusers base model folder, each
  loaded only while its loss grid is computed (what ``smplora audit --reference`` uses).

``mode``: ``"online"`` (LiRA/RMIA use IN and OUT references: every audited sample must be IN for
at least one reference and OUT for at least one), ``"offline"`` (only the references each sample
is OUT of), or ``"auto"`` (online when every audited sample has IN and OUT references).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .attacks.registry import BUILTIN_ATTACKS
from .target import check_target, load_lora_target
from .types import AuditError, AuditSamples

MODES = ("online", "offline", "auto")
MIN_REFERENCES = 2
REFERENCE_ATTACKS = ("lira_online", "lira_offline", "rmia")  # run by default when references are given


@dataclass
class ReferenceModel:
    """One reference: a target (or a loader for it) and the identities it trained on."""

    trained: FrozenSet[str]
    target: Any = None
    loader: Optional[Callable[[], Any]] = None
    name: str = ""
    train_seconds: Optional[float] = None

    def get(self) -> Any:
        """The target, loading it if needed."""
        if self.target is None:
            if self.loader is None:
                raise AuditError(f"reference {self.name!r} has neither a target nor a loader.")
            return self.loader()
        return self.target


@dataclass
class References:
    """Reference models for LiRA / RMIA (see the module docstring)."""

    models: List[ReferenceModel]
    mode: str = "auto"
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AuditError(f"reference mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}.")
        if len(self.models) < MIN_REFERENCES:
            raise AuditError(f"{len(self.models)} reference model(s) given; LiRA and RMIA need at least "
                             f"{MIN_REFERENCES} (8 or more for useful per-example statistics).")
        for m in self.models:
            if m.target is not None:
                check_target(m.target)

    def __len__(self) -> int:
        return len(self.models)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_targets(cls, pairs: Iterable[Tuple[Any, Iterable[str]]], *, mode: str = "auto") -> "References":
        """``pairs``: ``(target, trained_ids)``; ids as ``AuditSamples.identity()`` gives them."""
        models = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise AuditError(f"reference {i} must be a (target, trained_ids) pair, got {type(pair).__name__}.")
            target, ids = pair
            if isinstance(ids, str):
                raise AuditError(f"reference {i}: trained_ids must be a list of ids, not one string.")
            models.append(ReferenceModel(frozenset(str(s) for s in ids), target=target, name=f"reference {i}"))
        return cls(models, mode=mode)

    @classmethod
    def train(cls, trainer: Callable[[Any, int], Any], pool: Any, n: int, seed: int, *, mode: str = "auto",
              log: Optional[Callable[[str], None]] = None) -> "References":
        """Train ``n`` references with ``trainer(train_samples, seed)`` on random halves of ``pool``.

        ``pool`` (:class:`~.types.AuditSamples`): the population pool, which should contain the
        audited members and non-members for the online variant. The assignment is balanced: each
        pool sample is IN for exactly ``n // 2`` references (a seeded random choice per sample),
        so a reference's training set has about half of the pool.
        """
        if not isinstance(pool, AuditSamples):
            raise AuditError(f"pool must be AuditSamples, got {type(pool).__name__}.")
        if isinstance(n, bool) or not isinstance(n, int) or n < MIN_REFERENCES:
            raise AuditError(f"n={n!r}: train at least {MIN_REFERENCES} references (8 or more is better).")
        if not callable(trainer):
            raise AuditError("trainer must be a callable trainer(train_samples, seed) -> AuditTarget.")
        keep = balanced_halves(len(pool), n, seed)
        ids = pool.identity()
        rng = np.random.default_rng(seed + 1)
        seeds = rng.integers(0, 2 ** 31 - 1, size=n).tolist()
        models = []
        for r in range(n):
            idx = np.flatnonzero(keep[r]).tolist()
            if not idx:
                raise AuditError(f"reference {r} would train on no sample; use a larger pool.")
            t0 = time.time()
            target = trainer(pool.subset(idx), int(seeds[r]))
            check_target(target)
            secs = time.time() - t0
            models.append(ReferenceModel(frozenset(ids[i] for i in idx), target=target, name=f"reference {r}",
                                         train_seconds=round(secs, 2)))
            if log is not None:
                log(f"reference {r + 1}/{n}: trained on {len(idx)} of {len(pool)} pool samples in {secs:.1f} s")
        return cls(models, mode=mode, info={"trained_with": "trainer callback", "pool": len(pool), "seed": seed})

    @classmethod
    def from_lora_files(cls, base_model: Any, pairs: Sequence[Tuple[Any, Iterable[str]]], *, mode: str = "auto",
                        device: Any = "cpu", like: Any = None, tokenizer: Any = None) -> "References":
        """References from LoRA files trained against ``base_model`` (a diffusers folder or a single file;
        ``tokenizer`` as for :func:`~.target.load_lora_target`).

        Each file is checked now (readable, same tensors and shapes as ``like``, the audited LoRA
        file, when given) and loaded with :func:`~.target.load_lora_target` only while its loss
        grid is computed.
        """
        want = _lora_shapes(Path(like)) if like is not None else None
        models = []
        for lora, ids in pairs:
            lora = Path(lora)
            if not lora.is_file():
                raise AuditError(f"reference LoRA {lora} does not exist.")
            shapes = _lora_shapes(lora)
            if want is not None and shapes != want:
                raise AuditError(
                    f"reference LoRA {lora} does not match the audited LoRA ({len(shapes)} tensors vs {len(want)}, "
                    f"shapes differ, e.g. {_first_diff(shapes, want)}): "
                    "reference LoRAs must be trained on the same base model with the same LoRA settings "
                    "(rank, target modules, text-encoder LoRA or not).")
            models.append(ReferenceModel(frozenset(str(s) for s in ids), name=str(lora),
                                         loader=lambda lora=lora: load_lora_target(
                                             base_model, lora, device=device, tokenizer=tokenizer)))
        return cls(models, mode=mode, info={"trained_with": "LoRA files", "base_model": str(base_model)})


def balanced_halves(n_samples: int, n_refs: int, seed: int) -> np.ndarray:
    """``(n_refs, n_samples)`` bool: each sample IN for exactly ``n_refs // 2`` references (seeded)."""
    rng = np.random.default_rng(seed)
    order = rng.random((n_refs, n_samples)).argsort(0).argsort(0)  # a random rank of each ref per sample
    return order < n_refs // 2


def _first_diff(a: List[Tuple[int, ...]], b: List[Tuple[int, ...]]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} vs {y}"
    return "a missing tensor"


def _lora_shapes(path: Path) -> List[Tuple[int, ...]]:
    """Sorted tensor shapes of a LoRA file after diffusers' conversion.

    Names differ between kohya and peft files of the same LoRA, shapes do not; a different rank,
    target-module set or base model changes them.
    """
    if path.suffix != ".safetensors":
        raise AuditError(f"LoRA file {path} is not a .safetensors file; only safetensors LoRA files are read.")
    from diffusers import StableDiffusionPipeline

    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as exc:
        raise AuditError(f"{path} could not be read as a LoRA file (diffusers/peft or kohya format): {exc}") from exc
    return sorted(tuple(v.shape) for v in state.values())


# ---------------------------------------------------------------------------------------------
# the view a ScoreContext uses: membership of the audited samples, the mode, lazy targets


class ReferenceView:
    """References matched to the ``N`` audited samples of one audit (index order of the context).

    ``inside``: ``(R, N)`` bool, sample ``i`` IN the training set of reference ``r``.
    ``mode``: the resolved mode, ``"online"`` or ``"offline"``.
    """

    def __init__(self, references: References, inside: np.ndarray, mode: str):
        self.references = references
        self.inside = inside
        self.mode = mode

    def __len__(self) -> int:
        return len(self.references)

    def target(self, r: int) -> Any:
        return self.references.models[r].get()

    def summary(self) -> Dict[str, Any]:
        n_in = self.inside.sum(0)
        secs = [m.train_seconds for m in self.references.models if m.train_seconds is not None]
        d: Dict[str, Any] = {"count": len(self), "mode": self.mode,
                             "in_per_sample_min_mean_max": [int(n_in.min()), round(float(n_in.mean()), 2),
                                                            int(n_in.max())],
                             **self.references.info}
        if secs:
            d["train_seconds_per_reference"] = round(float(np.mean(secs)), 2)
        return d


def match(references: References, samples: Any) -> ReferenceView:
    """Match ``references`` to the audited ``samples`` (AuditSamples) and resolve the mode.

    Raises :class:`AuditError` when the requested mode is impossible with these references.
    """
    if not isinstance(references, References):
        raise AuditError(f"references must be a smplora_plugin.audit.References, got {type(references).__name__}; "
                         "build one with References.from_targets, References.train or References.from_lora_files.")
    ids = samples.identity()
    pix = AuditSamples(samples.images).identity() if samples.ids is not None else ids
    inside = np.array([[a in m.trained or b in m.trained for a, b in zip(ids, pix)] for m in references.models],
                      dtype=bool)
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    online_ok = bool(n_in.min() >= 1 and n_out.min() >= 1)
    mode = references.mode
    if mode == "auto":
        mode = "online" if online_ok else "offline"
    if mode == "online" and not online_ok:
        lack_in, lack_out = int((n_in == 0).sum()), int((n_out == 0).sum())
        raise AuditError(
            f"online LiRA/RMIA need every audited sample IN at least one reference and OUT of at least one; "
            f"{lack_in} sample(s) are in no reference's training set and {lack_out} in all of them. Train the "
            "references on random halves of a pool that contains the audited members and non-members, or use "
            "reference mode 'offline'.")
    if mode == "offline" and n_out.min() < 1:
        raise AuditError(f"{int((n_out == 0).sum())} audited sample(s) are in every reference's training set; "
                         "offline LiRA/RMIA need references that did not train on them.")
    return ReferenceView(references, inside, mode)


def check_compatible(view: ReferenceView, target: Any, images: torch.Tensor) -> None:
    """Cheap checks that in-memory references share the target's base model (schedule and encoder).

    References loaded from files are checked when :meth:`References.from_lora_files` builds them.
    """
    ac = torch.as_tensor(target.alphas_cumprod).float()
    x = images[:4]
    z = torch.as_tensor(target.encode(x)).float().cpu()
    for m in view.references.models:
        if m.target is None:
            continue
        if int(m.target.num_train_timesteps) != int(target.num_train_timesteps) or not torch.allclose(
                torch.as_tensor(m.target.alphas_cumprod).float(), ac, atol=1e-6):
            raise AuditError(f"{m.name} has a different noise schedule from the audited target: reference models "
                             "must share the audited LoRA's base model.")
        zr = torch.as_tensor(m.target.encode(x)).float().cpu()
        if zr.shape != z.shape or not torch.allclose(zr, z, atol=1e-4, rtol=1e-4):
            raise AuditError(f"{m.name} encodes images differently from the audited target: reference models must "
                             "share the audited LoRA's base model (same VAE).")


def select_attacks(attack_objs: List[Any], default_suite: bool, view: Optional[ReferenceView]) -> List[Any]:
    """Add (default suite) or check (explicit list) the reference attacks for this audit."""
    names = {a.name for a in attack_objs}
    if default_suite:
        if view is None:
            return attack_objs
        extra = [BUILTIN_ATTACKS[n]() for n in REFERENCE_ATTACKS if n not in names
                 and (n != "lira_online" or view.mode == "online")]
        return attack_objs + extra
    for a in attack_objs:
        need = getattr(a, "needs_references", None)
        if need and view is None:
            raise AuditError(f"attack {a.name!r} needs reference models: pass references=References(...) to run_audit "
                             "(CLI: --reference LORA=MANIFEST), or drop the attack.")
        if need == "online" and view is not None and view.mode != "online":
            raise AuditError(f"attack {a.name!r} needs online references (every audited sample IN some reference and "
                             "OUT of another); these references are offline. Use lira_offline, or train the references "
                             "on random halves of a pool that contains the audited samples.")
    return attack_objs
