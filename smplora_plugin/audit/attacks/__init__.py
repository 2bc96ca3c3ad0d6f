"""Membership-inference attacks with one interface (:class:`Attack`), one module per attack
family, and their registry (:mod:`.registry`).

Each attack module computes its own statistic from the shared operations of
:class:`~smplora_plugin.audit.engine.ScoreContext` and owns its settings (an options dataclass
registered with :func:`~smplora_plugin.audit.config.register_options`). Third-party attacks:
subclass :class:`Attack`, then call :func:`register_attack`, or implement the
``smplora_register_attacks(register)`` hook in an ``smplora`` entry-point plugin.
"""

from . import registry
from .base import Attack, AttackOutput, CrossFitted
from .blind import BlindBaseline
from .clid import CLiDAttack, CLiDOptions, CLiDVecAttack
from .generation import GenerationAttack
from .gsa import GSAAttack
from .loss import BestTimestepLossAttack, CalibratedLossAttack, LossAttack
from .mlp import MLPAttack, MLPOptions
from .pia import PIAAttack, PIAOptions
from .quantile import QuantileRegressionAttack
from .registry import (
    BUILTIN_ATTACKS,
    DEFAULT_ATTACKS,
    FAST_ATTACKS,
    SUITES,
    available_attacks,
    register_attack,
    resolve_attacks,
)
from .secmi import SecMIAttack, SecMIOptions
from .sima import SimAAttack, SimAOptions
from .stacked import GradientBoostingAttack, LogRegAttack, scalar_features

__all__ = [
    "Attack", "AttackOutput", "BUILTIN_ATTACKS", "DEFAULT_ATTACKS", "FAST_ATTACKS", "SUITES",
    "BestTimestepLossAttack", "BlindBaseline",
    "CLiDAttack", "CLiDVecAttack", "CalibratedLossAttack", "GradientBoostingAttack", "LogRegAttack", "LossAttack",
    "MLPAttack",
    "PIAAttack", "SecMIAttack", "SimAAttack", "available_attacks", "register_attack",
    "registry", "resolve_attacks", "scalar_features",
]
from .lira import LiRAOfflineAttack, LiRAOnlineAttack  # noqa: E402
from .rmia import RMIAAttack  # noqa: E402

__all__ += ["CLiDOptions", "CrossFitted", "MLPOptions", "PIAOptions", "SecMIOptions", "SimAOptions"]
__all__ += ["GSAAttack", "GenerationAttack", "LiRAOfflineAttack", "LiRAOnlineAttack", "QuantileRegressionAttack",
            "RMIAAttack"]
