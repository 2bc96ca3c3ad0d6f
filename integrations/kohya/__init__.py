"""kohya sd-scripts integration of smplora-plugin.

- ``smplora-kohya train_network.py <kohya args> --privacy smplora`` (see :mod:`.launcher`);
- :func:`make_private_trainer` / :func:`private_trainer_class` for in-process callers;
- :func:`annotate` to add ``smplora.*`` metadata to any other ``.safetensors`` output.

Needs sd-scripts v0.10.0 or newer at run time; nothing of sd-scripts is imported until used.
"""

from smplora_plugin.metadata import annotate

from .checkpoints import state_path_for_checkpoint
from .compat import KohyaVersionError, check_trainer_class, missing_hooks
from .mixin import SmploraTrainerMixin
from .options import KohyaPrivacySettings, add_privacy_arguments, settings_from_namespace
from .trainer import make_private_trainer, private_trainer_class

__all__ = [
    "make_private_trainer", "private_trainer_class", "annotate", "SmploraTrainerMixin", "add_privacy_arguments",
    "settings_from_namespace", "KohyaPrivacySettings", "KohyaVersionError", "check_trainer_class", "missing_hooks",
    "state_path_for_checkpoint",
]
