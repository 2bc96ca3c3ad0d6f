"""``make_private_trainer`` / ``private_trainer_class`` for in-process callers (ComfyUI nodes, GUIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import InputError

from .compat import check_trainer_class
from .mixin import SmploraTrainerMixin
from .options import settings_from_mapping

_CLASSES: Dict[type, type] = {}


class TrainerClassError(InputError, TypeError):
    """What was passed as the kohya trainer class is not a class (still a :class:`TypeError`, as it always was)."""


def private_trainer_class(trainer_cls: type) -> type:
    """``(SmploraTrainerMixin, trainer_cls)``, feature-checked and cached per class."""
    if not isinstance(trainer_cls, type):
        raise TrainerClassError("expected a kohya trainer class (e.g. train_network.NetworkTrainer), "
                                f"got {trainer_cls!r}.")
    if issubclass(trainer_cls, SmploraTrainerMixin):
        return trainer_cls
    check_trainer_class(trainer_cls)
    cls = _CLASSES.get(trainer_cls)
    if cls is None:
        cls = type(f"Smplora{trainer_cls.__name__}", (SmploraTrainerMixin, trainer_cls),
                   {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} with the SMP-LoRA defense."})
        _CLASSES[trainer_cls] = cls
    return cls


def make_private_trainer(trainer_cls: type, config: Union[PrivacyConfig, Dict[str, Any], None] = None, *,
                         holdout_dir: Optional[Union[str, Path]] = None, manifest: Optional[Union[str, Path]] = None,
                         attacker_state: Optional[Union[str, Path]] = None):
    """An instance of ``trainer_cls`` (any sd-scripts ``NetworkTrainer`` subclass) with SMP-LoRA on.

    Example (a ComfyUI node that already builds kohya ``args``)::

        import train_network
        from smplora_plugin.integrations.kohya import make_private_trainer
        trainer = make_private_trainer(train_network.NetworkTrainer, {"alpha": 0.05},
                                       holdout_dir="/data/holdout")
        trainer.train(args)

    ``config`` is a :class:`~smplora_plugin.PrivacyConfig`, or a mapping of its fields
    (``alpha``, ``k_steps``...) and/or kohya option names (``privacy_alpha``,
    ``privacy_holdout_dir``, ``privacy_noise_multiplier``...; ``{"privacy": "dpsgd",
    "privacy_noise_multiplier": 1.0}`` is DP-SGD alone); ``None`` reads the ``privacy*`` attributes of
    ``args`` at ``train(args)`` time (then ``args.privacy`` must be ``"smplora"``, ``"mplora"`` or ``"dpsgd"``).
    Invalid values raise :class:`~smplora_plugin.errors.ConfigError` here, before training.
    """
    cls = private_trainer_class(trainer_cls)
    trainer = cls()
    if config is not None or holdout_dir is not None or manifest is not None or attacker_state is not None:
        mapping: Dict[str, Any] = {}
        if isinstance(config, PrivacyConfig):
            mapping.update(config.to_dict())
        elif config is not None:
            mapping.update(config)
        for key, value in (("privacy_holdout_dir", holdout_dir), ("privacy_manifest", manifest),
                           ("privacy_attacker_state", attacker_state)):
            if value is not None:
                mapping[key] = str(value)
        if isinstance(mapping.get("hidden"), list):
            mapping["hidden"] = tuple(mapping["hidden"])
        if isinstance(mapping.get("feature_grid"), list):
            mapping["feature_grid"] = tuple(mapping["feature_grid"])
        trainer._smplora_override = settings_from_mapping(mapping)
    return trainer
