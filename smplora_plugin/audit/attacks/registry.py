"""Registry of attacks: the built-ins, ones registered by name, and ``smplora_register_attacks`` plugins."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type, Union

from ..target import AuditError, missing_capabilities
from .base import Attack
from .blind import BlindBaseline
from .clid import CLiDAttack, CLiDVecAttack
from .generation import GenerationAttack
from .gsa import GSAAttack
from .loss import BestTimestepLossAttack, CalibratedLossAttack, LossAttack
from .mlp import MLPAttack
from .pia import PIAAttack
from .quantile import QuantileRegressionAttack
from .secmi import SecMIAttack

# the statistic attacks first: the order their option sets register in is report.json's timesteps order
from .sima import SimAAttack
from .stacked import GradientBoostingAttack, LogRegAttack

BUILTIN_ATTACKS: Dict[str, Type[Attack]] = {
    cls.name: cls
    for cls in (LossAttack, CalibratedLossAttack, BestTimestepLossAttack, SimAAttack, SecMIAttack, PIAAttack,
                CLiDAttack, CLiDVecAttack, MLPAttack, LogRegAttack, GradientBoostingAttack, BlindBaseline)
}
BUILTIN_ATTACKS.update({cls.name: cls for cls in (QuantileRegressionAttack, GSAAttack, GenerationAttack)})
_EXTRA: Dict[str, Type[Attack]] = {}

DEFAULT_ATTACKS = ("loss", "loss_calibrated", "loss_best_t", "sima", "secmi", "pia", "clid", "clid_vec", "mlp",
                   "logreg", "gboost", "blind", "quantile", "gsa", "generation")
#: ``smplora audit --fast`` (``attacks="fast"``): the default suite without its two costliest attacks, GSA (a
#: backward pass per sample) and the generation attack (DDIM sampling per distinct caption); it keeps every
#: attack that headed a frontier row (benchmarks/RESULTS.md, "Audit cost"). Without the generation attack,
#: ``exposure.png`` has no nearest generated sample.
FAST_ATTACKS = tuple(a for a in DEFAULT_ATTACKS if a not in ("gsa", "generation"))
#: suites by name: what ``attacks="default"`` / ``"fast"`` stand for (reference attacks are added to either
#: when the audit has reference models, as to the default suite)
SUITES: Dict[str, Tuple[str, ...]] = {"default": DEFAULT_ATTACKS, "fast": FAST_ATTACKS}


def suite_name(attacks: Any) -> Optional[str]:
    """``"default"`` for ``None``, the name for a suite name, ``None`` for an explicit list of attacks."""
    if attacks is None:
        return "default"
    if isinstance(attacks, str):
        if attacks not in SUITES:
            raise AuditError(f"attacks={attacks!r}: a suite name is one of {sorted(SUITES)}; pass a list for "
                             "named attacks.")
        return attacks
    return None


def register_attack(name: str, cls: Type[Attack]) -> None:
    """Register ``cls`` (a subclass of :class:`Attack`) under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise AuditError(f"attack {name!r} must be a subclass of smplora_plugin.audit.attacks.Attack, got {cls!r}.")
    if not name or name in BUILTIN_ATTACKS:
        raise AuditError(f"attack name {name!r} is empty or taken by a built-in attack.")
    if not getattr(cls, "name", ""):
        cls.name = name
    elif cls.name != name:
        raise AuditError(f"attack class {cls.__name__} is named {cls.name!r} but registered as {name!r}.")
    _EXTRA[name] = cls


def available_attacks(load_plugins: bool = True, plugins: Optional[List[object]] = None) -> Dict[str, Type[Attack]]:
    """Built-in attacks plus registered ones, plus those of ``smplora_register_attacks`` plugins.

    Plugins are the installed ``smplora`` entry points (unless ``SMPLORA_DISABLE_PLUGINS``), or
    the explicit ``plugins`` list when given.
    """
    if load_plugins or plugins is not None:
        from ...plugins import make_plugin_manager

        make_plugin_manager(plugins).hook.smplora_register_attacks(register=register_attack)
    return {**BUILTIN_ATTACKS, **_EXTRA}


def resolve_attacks(attacks: Union[None, str, List[Any]], has_captions: bool, load_plugins: bool = True, *,
                    target: Any = None, skipped: Optional[Dict[str, str]] = None) -> List[Attack]:
    """Turn names / classes / instances into attack instances; ``None`` = the default suite, a name of
    :data:`SUITES` (``"fast"``) that suite (its attacks skipped, not refused, where they cannot run).

    With ``target``, an attack whose ``requires`` lists a capability the target lacks (see
    :data:`~smplora_plugin.audit.target.CAPABILITIES`) is left out of the default suite, with the
    reason in ``skipped``, and raises :class:`AuditError` when asked for explicitly.
    """
    suite = suite_name(attacks)
    if suite is not None:
        attacks = None
    registry = available_attacks(load_plugins) if attacks is None or any(isinstance(a, str) for a in attacks) \
        else dict(BUILTIN_ATTACKS)
    chosen = list(SUITES[suite]) + sorted(_EXTRA) if suite is not None else list(attacks)
    out: List[Attack] = []
    for a in chosen:
        if isinstance(a, str):
            if a not in registry:
                raise AuditError(f"unknown attack {a!r}; available: {', '.join(sorted(registry))}.")
            inst = registry[a]()
        elif isinstance(a, type) and issubclass(a, Attack):
            inst = a()
        elif isinstance(a, Attack):
            inst = a
        else:
            raise AuditError(f"{a!r} is not an attack name, Attack subclass or Attack instance.")
        if inst.needs_captions and not has_captions:
            if attacks is None:
                continue  # the CLiD attacks are skipped silently in the default suite when there are no captions
            raise AuditError(f"attack {inst.name!r} needs captions; give captions or drop it.")
        lacking = [] if target is None else missing_capabilities(target, getattr(inst, "requires", ()))
        if lacking:
            why = (f"the target ({type(target).__name__}) lacks the {', '.join(lacking)} capability "
                   "(see smplora_plugin.audit.target.CAPABILITIES)")
            if attacks is None:
                if skipped is not None:
                    skipped[inst.name] = why
                continue
            raise AuditError(f"attack {inst.name!r} cannot run: {why}; implement it or drop the attack.")
        out.append(inst)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise AuditError(f"attack names must be unique, got {names}.")
    return out

# reference-model attacks: built in, run by default only when the audit has reference models
# (run_audit(..., references=...); see smplora_plugin.audit.references)
from .lira import LiRAOfflineAttack, LiRAOnlineAttack  # noqa: E402
from .rmia import RMIAAttack  # noqa: E402

BUILTIN_ATTACKS.update({cls.name: cls for cls in (LiRAOnlineAttack, LiRAOfflineAttack, RMIAAttack)})
