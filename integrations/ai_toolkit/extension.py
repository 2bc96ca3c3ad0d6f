"""The ai-toolkit extension: ``AI_TOOLKIT_EXTENSIONS`` for the module ``smplora-ai-toolkit install`` writes.

ai-toolkit's ``toolkit/extension.py`` imports every module in ``extensions/`` and calls ``get_process()`` of each
extension it lists, for every job; the process type (``type: sd_trainer_smplora`` in the YAML) then selects ours.
This module imports ai-toolkit (``toolkit.extension``), so only ai-toolkit imports it.
"""

from __future__ import annotations

from toolkit.extension import Extension

from .process import PROCESS_TYPE, process_class


class SmploraTrainerExtension(Extension):
    """``type: sd_trainer_smplora``: ai-toolkit's SDTrainer with the SMP-LoRA privacy term (a ``privacy:`` block)."""

    uid = PROCESS_TYPE
    name = "SD Trainer with SMP-LoRA (smplora-plugin)"

    @classmethod
    def get_process(cls):
        return process_class()


AI_TOOLKIT_EXTENSIONS = [SmploraTrainerExtension]
