"""Validated configuration of the privacy regulariser."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional, Tuple, Union

from .errors import ConfigError

GridLike = Union[int, Tuple[int, int], None]

_OBJECTIVES = {"smp": "smp", "smplora": "smp", "ratio": "smp", "mp": "mp", "mplora": "mp", "sum": "mp"}


#: Named settings for :meth:`PrivacyConfig.preset`: the fields each one sets on top of the defaults.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "paper": {},
    "robust": {"calibrated": True, "alpha": 20.0, "attacker_lr": 1e-3, "privacy_fraction": 0.25, "feature_grid": 32},
}


@dataclass(frozen=True)
class PrivacyConfig:
    """Hyperparameters of SMP-LoRA / MP-LoRA. Defaults follow the paper (Luo et al., AAAI 2025).

    Attributes:
        objective: ``"smp"`` minimises ``L / (beta + alpha * CE_m + delta)`` (bounded, stable;
            the default); ``"mp"`` minimises ``L - alpha * CE_m`` (unbounded; a baseline only).
        alpha: weight of the attacker's member cross-entropy ``CE_m``. Larger hides members
            better and costs more utility (paper: 0.05; its launch scripts used 1).
        beta: constant in the SMP denominator; the denominator is ``>= beta``, so ``beta``
            caps how much the adaptation gradient can be scaled up. Must be > 0.
        delta: numerical guard added to the denominator (paper: 1e-5).
        k_steps: attacker updates per optimiser step. More steps give a stronger, faster
            proxy (a harder adversary) at the cost of an MLP step each; 0 freezes it.
        hidden: hidden widths of the proxy attacker MLP (paper: 512, 256). Wider learns more
            at higher memory (the first layer has ``D * hidden[0]`` weights).
        dropout: dropout of the attacker while it trains (paper: 0.5); off when it scores.
        attacker_lr: Adam learning rate of the attacker (paper: 1e-5). Too low and the proxy
            never catches the leakage of a small model; too high and it is noisy.
        attacker_weight_decay: Adam weight decay of the attacker (paper: 1e-4).
        feature_grid: loss maps are average-pooled per channel down to this grid (int or (h, w)),
            capped at the first batch's map size (never pooled up), and that size is kept for
            the run, so any resolution or bucket gives the same attacker input. The default 16
            pools SD1.5's 64x64 latents to 16x16 cells of 4x4: a 1024-wide attacker input and an
            attacker state of about 8 MB; the ``robust`` preset's 32 (cells of 2x2, as private
            as no pooling on the frontier, where 4x4 cells were not) a 4096-wide input and about
            27 MB; 64, the paper's input at SD1.5, 16384 and about 100 MB (benchmarks/RESULTS.md).
            ``None`` flattens unpooled maps (sizes must not change).
        calibrated: the attacker sees base-calibrated loss maps, ``(pred - target)^2 -
            (base_pred - target)^2``, where ``base_pred`` is the prediction of the model with the
            LoRA disabled at the same noisy input (pass ``reference=`` to ``reg.features``). It
            removes each sample's and noise draw's own difficulty, the noise that keeps a proxy on
            raw maps near chance on small models, at the price of a no-grad base forward for the
            member batch (and the non-member batch when it is refreshed). Off by default.
        privacy_fraction: share of the member samples that feed the privacy term, taken over steps
            with no random draw: step ``k`` uses the first ``ceil((k+1) f B) - ceil(k f B)`` samples of
            its batch of ``B`` (``reg.privacy_rows(batch)``), so a batch of 4 at 0.25 gives one row every
            step and a batch of 1 one row every fourth step (steps 0, 4, 8, ...); a step with no row
            skips the attacker update, the member features and (calibrated) the base forward. Non-member
            batches hold ``ceil(f B)`` samples (``reg.nonmember_rows(batch)``). The term's estimate gets
            noisier, not biased; below 1 it makes calibrated features cheaper, since the base forward
            and the non-member forwards run on that share only. 1 (the default) uses the whole batch.
        nonmember_every: refresh the non-member features every this many attacker updates;
            in between the attacker reuses the last non-member batch (a bank). 1 (the paper's
            schedule) needs a held-out forward every step; the default 4 amortises it to a quarter
            (see ``wants_nonmembers`` and benchmarks/RESULTS.md).
        seed: seeds the attacker's initialisation and dropout.
        device: device of the attacker; ``None`` uses the device of the first features.
    """

    objective: str = "smp"
    alpha: float = 0.05
    beta: float = 1.0
    delta: float = 1e-5
    k_steps: int = 1
    hidden: Tuple[int, ...] = (512, 256)
    dropout: float = 0.5
    attacker_lr: float = 1e-5
    attacker_weight_decay: float = 1e-4
    feature_grid: GridLike = 16
    calibrated: bool = False
    privacy_fraction: float = 1.0
    nonmember_every: int = 4
    seed: int = 0
    device: Optional[str] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        obj = self.objective
        if not isinstance(obj, str) or obj.lower() not in _OBJECTIVES:
            raise ConfigError(
                f"objective={obj!r} is unknown: use 'smp' (SMP-LoRA, the ratio form, default) "
                "or 'mp' (MP-LoRA, the sum form, a baseline)."
            )
        set_("objective", _OBJECTIVES[obj.lower()])
        set_("alpha", _number("alpha", self.alpha, lo=0.0, hint="use 0 to switch the regulariser off"))
        set_("beta", _number("beta", self.beta, lo=0.0, lo_open=True, hint="the paper uses 1"))
        set_("delta", _number("delta", self.delta, lo=0.0, hint="the paper uses 1e-5"))
        set_("k_steps", _integer("k_steps", self.k_steps, lo=0))
        set_("hidden", _hidden(self.hidden))
        set_("dropout", _number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True))
        set_("attacker_lr", _number("attacker_lr", self.attacker_lr, lo=0.0, lo_open=True))
        set_("attacker_weight_decay", _number("attacker_weight_decay", self.attacker_weight_decay, lo=0.0))
        set_("feature_grid", _grid(self.feature_grid))
        if not isinstance(self.calibrated, bool):
            raise ConfigError(f"calibrated={self.calibrated!r} must be True or False.")
        set_("privacy_fraction", _number("privacy_fraction", self.privacy_fraction, lo=0.0, lo_open=True, hi=1.0,
                                         hint="1 uses the whole batch; 0.25 a quarter of it"))
        set_("nonmember_every", _integer("nonmember_every", self.nonmember_every, lo=1))
        set_("seed", _integer("seed", self.seed, lo=0))
        if self.device is not None:
            try:
                import torch

                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"device={self.device!r} is not a torch device ({exc}); "
                                  "use e.g. 'cpu' or 'cuda:0'.") from None
            set_("device", str(self.device))

    def privacy_rows(self, batch_size: int, step: int = 0) -> int:
        """Rows of the batch of call ``step`` (0-based) of ``reg.step`` that feed the privacy term.

        The fraction is taken over steps, with no random draw: ``ceil((step + 1) f B) - ceil(step f B)``
        for ``f = privacy_fraction`` and ``B = batch_size``, so the counts add up to ``ceil(K f B)`` over
        the first ``K`` batches and the first batch always has at least one row. ``f B`` whole (e.g. 0.25 of
        a batch of 4, or 1) gives ``f B`` rows on every step; below that some steps get none, e.g. at batch 1
        with ``f = 0.25`` steps 0, 4, 8, ... carry one row and the others none (their loss is scaled by the
        last denominator, see :meth:`PrivacyRegularizer.step`).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a whole number >= 0, got {step!r}.")
        share = self._fraction() * batch_size
        return _ceil(share * (step + 1)) - _ceil(share * step)

    def nonmember_rows(self, batch_size: int) -> int:
        """``ceil(privacy_fraction * batch_size)``, at least 1: the size of a held-out (non-member) batch
        drawn for a training batch of ``batch_size`` (the rows of its first step, :meth:`privacy_rows`)."""
        return self.privacy_rows(batch_size, 0)

    def _fraction(self) -> Fraction:
        """``privacy_fraction`` as an exact fraction (denominator <= 10**6), so the schedule has no rounding."""
        return Fraction(self.privacy_fraction).limit_denominator(10 ** 6)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of every field."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["feature_grid"] = None if self.feature_grid is None else list(self.feature_grid)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyConfig":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of config fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}.")
        kwargs = dict(data)
        if isinstance(kwargs.get("hidden"), list):
            kwargs["hidden"] = tuple(kwargs["hidden"])
        if isinstance(kwargs.get("feature_grid"), list):
            kwargs["feature_grid"] = tuple(kwargs["feature_grid"])
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PrivacyConfig":
        """A named setting, with ``overrides`` applied on top.

        - ``"paper"``: the paper's hyperparameters (the dataclass defaults), with this project's
          default ``feature_grid`` of 16 (the paper's 64x64 input is ``feature_grid=64``).
        - ``"robust"``: what this project's frontier supports against the full attack suite
          (benchmarks/RESULTS.md): base-calibrated features, a 20x stronger attacker term, a
          faster attacker, the privacy term on a quarter of the samples (``privacy_fraction=0.25``:
          a quarter of each batch, or at batch 1 every fourth step), which keeps the base forward to a quarter
          of the samples, and loss maps pooled to at most 32x32
          (``feature_grid=32``).
        """
        if name not in PRESETS:
            raise ConfigError(f"preset {name!r} is unknown: use one of {sorted(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "PrivacyConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def algorithm_fields(self) -> dict:
        """Fields that define the algorithm and the state layout (all but ``device``)."""
        d = self.to_dict()
        d.pop("device")
        return d


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _number(name: str, value: Any, *, lo=None, hi=None, lo_open=False, hi_open=False, hint: str = "") -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a number, not a bool.")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # accept numeric strings from TOML/argparse-free sources
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be a number.") from None
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be finite.")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
        rng = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"{name}={value!r} is out of range: it must be {rng}." + (f" ({hint})" if hint else ""))
    return value


def _integer(name: str, value: Any, *, lo: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be an integer, not a bool.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer.")
    if value < lo:
        raise ConfigError(f"{name}={value!r} must be >= {lo}.")
    return value


def _hidden(value: Any) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        widths = tuple(value)
    except TypeError:
        raise ConfigError(f"hidden={value!r} must be a sequence of positive ints, e.g. (512, 256).") from None
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ConfigError(f"hidden={value!r} must be a non-empty sequence of positive ints, e.g. (512, 256).")
    return widths


def _grid(value: Any) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        grid = tuple(value)
    except TypeError:
        grid = ()
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
        raise ConfigError(
            f"feature_grid={value!r} must be a positive int, a pair (h, w) of positive ints, or None (no pooling)."
        )
    return grid  # type: ignore[return-value]
