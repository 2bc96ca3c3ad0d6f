"""SMP-LoRA for ostris/ai-toolkit: a process type, ``sd_trainer_smplora``, that is ai-toolkit's own ``SDTrainer``
with the privacy term, configured by a ``privacy:`` block in the process YAML (docs/ai-toolkit.md)::

    smplora-ai-toolkit install /path/to/ai-toolkit      # writes extensions/smplora.py
    # in the job YAML: type: sd_trainer_smplora, plus
    privacy:
      method: smplora
      preset: robust
      holdout_folder: /data/holdout

The modules: :mod:`.config` (the ``privacy:`` block), :mod:`.source` (the pieces of ai-toolkit used, checked on
the classes and in a checkout), :mod:`.holdout` (members, non-members, manifest, held-out draws), :mod:`.forward`
(loss target, base prediction), :mod:`.run` (one private process), :mod:`.dp_noise` (DP noise: ``method: dpsgd``,
or SMP-LoRA + DP noise), :mod:`.process` (the ``SDTrainer`` subclass, built on first use), :mod:`.extension`
(``AI_TOOLKIT_EXTENSIONS``; imports ai-toolkit) and :mod:`.install` (the ``smplora-ai-toolkit`` command).
Importing this package needs no ai-toolkit, and no algorithm code lives here: the core
(:class:`smplora_plugin.PrivacyRegularizer`, :class:`smplora_plugin.dp.DPTraining`) does the work.
"""

from .config import AitkPrivacySettings, check_train_options, parse_privacy_block
from .process import PROCESS_TYPE, build_process_class, process_class
from .run import PrivateRun
from .source import TESTED, TESTED_COMMIT, AiToolkitVersionError, check_source, source_problems

__all__ = [
    "PROCESS_TYPE", "TESTED", "TESTED_COMMIT", "AitkPrivacySettings", "AiToolkitVersionError", "PrivateRun",
    "build_process_class", "check_source", "check_train_options", "parse_privacy_block", "process_class",
    "source_problems",
]
