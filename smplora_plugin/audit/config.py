"""Audit settings: :class:`AuditConfig` (protocol level) and the attacks' own option sets.

An attack with settings declares them as a small dataclass in its own module and registers it
with :func:`register_options` (as opacus' grad samplers register themselves). ``AuditConfig``
carries overrides by option-set name, ``attack_options={"sima": {"p": 2.0}}``; the flat field
names of earlier versions (``sima_p``, ``secmi_t``, ``mlp_lr``, ...) are still accepted and map
to the option sets registered with a ``legacy_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, TypeVar, Union

from .types import AuditError

_OPTIONS: Dict[str, type] = {}  # option-set name -> options dataclass
_LEGACY: Dict[str, Tuple[str, str]] = {}  # flat AuditConfig field -> (option set, option)

C = TypeVar("C", bound=type)


def register_options(name: str, *, legacy_prefix: str = "") -> Callable[[C], C]:
    """Class decorator: register an options dataclass as option set ``name``.

    The dataclass may define ``validate()`` (raise :class:`AuditError`) and ``schedule(T)`` (the
    timesteps it queries at the target's ``T``, for report.json's ``timesteps`` block). With
    ``legacy_prefix``, ``<prefix><option>`` is accepted as a flat :class:`AuditConfig` field.
    """
    def decorate(cls: C) -> C:
        _OPTIONS[name] = cls
        if legacy_prefix:
            _LEGACY.update({legacy_prefix + f.name: (name, f.name) for f in fields(cls)})
        return cls
    return decorate


def make_options(name: str, values: Optional[Mapping[str, Any]] = None, *, validate: bool = True) -> Any:
    """Option set ``name`` with ``values`` over its defaults (JSON lists become tuples), validated."""
    if name not in _OPTIONS:
        raise AuditError(f"no attack has options named {name!r}; option sets: {sorted(_OPTIONS)}.")
    cls, values = _OPTIONS[name], dict(values or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AuditError(f"unknown option(s) {unknown} for {name!r}; its options: {known}.")
    opts = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if validate and hasattr(opts, "validate"):
        opts.validate()
    return opts


@dataclass(init=False)
class AuditConfig:
    """Protocol-level knobs of an audit. Timesteps are given for T = 1000 and rescaled to the target's T.

    ``attack_options``: overrides of the attacks' option sets by name (see :func:`register_options`
    and each attack module); flat legacy names such as ``sima_p=2.0`` map there too, and read back
    as attributes (``config.sima_p``).
    """

    seed: int = 0
    batch_size: int = 64
    timesteps: Tuple[int, ...] = (50, 100, 150, 200, 250, 300, 350, 400, 450, 500)
    draws: int = 4
    flip_average: bool = False  # average every model quantity over the image and its horizontal mirror
    near_duplicate_mse: float = 1e-3  # across-set image pairs closer than this (pooled pixels) are warned about
    map_grid: int = 32  # loss maps for the trained MLP are pooled to at most this size per side
    n_boot: int = 1000
    cv_folds: int = 5
    attack_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __init__(self, **settings: Any) -> None:
        own = {f.name: f for f in fields(AuditConfig) if f.name != "attack_options"}
        options = _options_dict(settings.pop("attack_options", None))
        unknown = sorted(k for k in settings if k not in own and k not in _LEGACY)
        if unknown:
            raise AuditError(f"unknown audit config field(s) {unknown}; valid fields: "
                             f"{sorted([*own, *_LEGACY, 'attack_options'])}.")
        for key in [k for k in settings if k in _LEGACY]:
            name, option = _LEGACY[key]
            options.setdefault(name, {})[option] = settings.pop(key)
        for name, f in own.items():
            setattr(self, name, settings.get(name, f.default))
        self.attack_options = options

    def __setattr__(self, key: str, value: Any) -> None:  # legacy flat names write to the option sets
        if key in _LEGACY:
            name, option = _LEGACY[key]
            self.attack_options.setdefault(name, {})[option] = value
        else:
            super().__setattr__(key, value)

    def __getattr__(self, key: str) -> Any:  # legacy flat names read through the option sets
        if key in _LEGACY:
            name, option = _LEGACY[key]
            return getattr(self.options(name, validate=False), option)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def options(self, name: str, *, validate: bool = True, **overrides: Any) -> Any:
        """Option set ``name``: its defaults, then ``attack_options[name]``, then ``overrides``."""
        return make_options(name, {**self.attack_options.get(name, {}), **overrides}, validate=validate)

    def schedules(self, T: int) -> Dict[str, Any]:
        """``schedule(T)`` of every option set that has one (report.json's ``timesteps`` block)."""
        sets = {name: self.options(name, validate=False) for name in _OPTIONS}
        return {name: opts.schedule(T) for name, opts in sets.items() if hasattr(opts, "schedule")}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the protocol fields, every legacy option under its flat name, other ``attack_options``."""
        d: Dict[str, Any] = {name: getattr(self, name) for name in (f.name for f in fields(self))
                             if name != "attack_options"}
        d.update({key: getattr(self, key) for key in _LEGACY})
        legacy_sets = {name for name, _ in _LEGACY.values()}
        rest = {name: {k: _plain(v) for k, v in opts.items()} for name, opts in self.attack_options.items()
                if name not in legacy_sets}
        if rest:
            d["attack_options"] = rest
        return {k: _plain(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AuditConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def validate(self) -> None:
        """Refuse bad settings, the attacks' option sets included, before any model work."""
        if self.draws < 1 or self.batch_size < 1:
            raise AuditError("draws and batch_size must be >= 1.")
        if not self.timesteps:
            raise AuditError("timesteps must list at least one timestep.")
        if self.near_duplicate_mse < 0:
            raise AuditError("near_duplicate_mse must be >= 0 (0 turns the near-duplicate warning off).")
        for name in sorted(set(_OPTIONS) | set(self.attack_options)):
            self.options(name)


@register_options("exposure")
@dataclass
class ExposureOptions:
    """The report's exposure ranking (:mod:`.exposure`): ``top_k`` members shown in report.md and exposure.png,
    and ``near_copy_quantile``, the share of calibration non-members whose nearest-generated distance sets
    the near-copy threshold (its lower quantile). Set with ``attack_options={"exposure": {"top_k": 4}}``."""

    top_k: int = 8
    near_copy_quantile: float = 0.01

    def validate(self) -> None:
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AuditError(f"exposure top_k={k!r} must be a whole number >= 1 (the most exposed members listed in "
                             'report.md and drawn in exposure.png; default 8), e.g. {"exposure": {"top_k": 8}}.')
        q = self.near_copy_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 0.5:
            raise AuditError(f"exposure near_copy_quantile={q!r} must be in (0, 0.5) (the share of calibration "
                             "non-members below the near-copy threshold; default 0.01).")


def as_config(config: Union[AuditConfig, Mapping[str, Any], None]) -> AuditConfig:
    """``config`` (an :class:`AuditConfig`, a mapping of its fields, or ``None``) as a validated AuditConfig."""
    cfg = config if isinstance(config, AuditConfig) else AuditConfig.from_dict(dict(config or {}))
    cfg.validate()
    return cfg


def _options_dict(value: Any) -> Dict[str, Dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise AuditError('attack_options must map option-set names to options, e.g. {"sima": {"p": 2.0}}.')
    return {str(k): dict(v) for k, v in value.items()}


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
