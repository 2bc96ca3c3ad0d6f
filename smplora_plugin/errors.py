"""Exceptions raised by smplora-plugin.

Every error is a :class:`SmploraError`, hence a :class:`ValueError`, whose message says what was
wrong and how to fix it; all of them are raised before any state (attacker weights, optimiser,
counters, files) changes. The subsystems add their own subclasses of these: ``AuditError`` and
``MetricError`` (:mod:`smplora_plugin.audit`), ``DPError`` (:mod:`smplora_plugin.dp`), and in the
trainer shims ``KohyaVersionError`` / ``LauncherError`` (kohya), ``FolderError`` and
``ComfyTrainingError`` (ComfyUI; the latter also a :class:`RuntimeError`).
"""

from __future__ import annotations


class SmploraError(ValueError):
    """Base class of every error raised by smplora-plugin."""


class ConfigError(SmploraError):
    """An invalid configuration value (names the field and the accepted range)."""


class FeatureError(SmploraError):
    """Features or losses passed to the regulariser have the wrong shape, dtype or values."""


class StateError(SmploraError):
    """A state file or state dict cannot be loaded into this regulariser."""


class HoldoutError(SmploraError):
    """Member and non-member data overlap, or a holdout set is missing or empty."""


class PluginError(SmploraError):
    """A plugin could not be loaded or returned something invalid."""


class InputError(SmploraError):
    """A trainer's input is missing, empty or of the wrong kind: latents, conditioning, LoRA weights,
    image folders, or a LoRA file that does not fit the model it is loaded on."""
