"""Membership-inference attacks with one interface (:class:`Attack`), one module per attack
family, and their registry (:mod:`.registry`).

Third-party attacks: subclass :class:`Attack`, then call :func:`register_attack`, or implement
the ``smplora_register_attacks(register)`` hook in an ``smplora`` entry-point plugin.
"""

from . import registry
from .base import Attack, AttackOutput
from .blind import BlindBaseline
from .clid import CLiDAttack, CLiDVecAttack
from .loss import BestTimestepLossAttack, CalibratedLossAttack, LossAttack
from .mlp import MLPAttack
from .pia import PIAAttack
from .registry import (BUILTIN_ATTACKS, DEFAULT_ATTACKS, available_attacks, register_attack,
                       resolve_attacks)
from .secmi import SecMIAttack
from .sima import SimAAttack
from .stacked import GradientBoostingAttack, LogRegAttack, scalar_features
from .quantile import QuantileRegressionAttack
from .gsa import GSAAttack
from .generation import GenerationAttack

__all__ = [
    "Attack", "AttackOutput", "BUILTIN_ATTACKS", "DEFAULT_ATTACKS", "BestTimestepLossAttack", "BlindBaseline",
    "CLiDAttack", "CLiDVecAttack", "CalibratedLossAttack", "GradientBoostingAttack", "LogRegAttack", "LossAttack", "MLPAttack",
    "PIAAttack", "SecMIAttack", "SimAAttack", "available_attacks", "register_attack",
    "registry", "resolve_attacks", "scalar_features",
]
from .lira import LiRAOfflineAttack, LiRAOnlineAttack  # noqa: E402
from .rmia import RMIAAttack  # noqa: E402

__all__ += ["GSAAttack", "GenerationAttack", "LiRAOfflineAttack", "LiRAOnlineAttack", "QuantileRegressionAttack",
            "RMIAAttack"]
