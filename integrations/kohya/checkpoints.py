"""The proxy attacker's state on disk in a kohya run: continued before training, saved with every LoRA checkpoint.

- :func:`state_to_continue` / :func:`resume`: the state a run continues (``--privacy_attacker_state FILE``, else
  the one in the ``--resume`` folder), refused when it was saved with other privacy settings;
- :class:`Checkpoints` (built at the first training step): the state next to each LoRA checkpoint
  (``name.smplora_state`` next to ``name.safetensors``: safetensors format, without a ``.safetensors`` suffix so
  that LoRA pickers do not list it) and in each ``--save_state`` folder (``smplora_state.safetensors``), and
  kohya's ``ss_*`` header in each saved LoRA as without the holdout block (:func:`.header.restore`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.errors import StateError
from smplora_plugin.state import config_from_state, read_state

from . import header
from .options import CONFIG_OPTIONS, KohyaPrivacySettings

logger = logging.getLogger("smplora.kohya")

STATE_DIR_FILE = "smplora_state.safetensors"   # inside a kohya --save_state folder
STATE_SUFFIX = ".smplora_state"                # next to each LoRA checkpoint
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt")


def state_path_for_checkpoint(ckpt_file: str) -> Path:
    """Where the attacker state of a LoRA checkpoint is saved: ``<ckpt without ext>.smplora_state``."""
    p = Path(ckpt_file)
    return p.with_name(p.stem + STATE_SUFFIX)


def state_to_continue(settings: KohyaPrivacySettings, args: Any) -> Optional[Path]:
    """``--privacy_attacker_state``, else the state in kohya's ``--resume`` folder (a warning when it has none:
    the attacker then starts from scratch); ``None`` for a new attacker."""
    resume_dir = getattr(args, "resume", None)
    if settings.attacker_state is not None or not resume_dir or getattr(args, "resume_from_huggingface", False):
        return settings.attacker_state
    candidate = Path(resume_dir) / STATE_DIR_FILE
    if candidate.is_file():
        return candidate
    logger.warning(f"SMP-LoRA: --resume {resume_dir} holds no {STATE_DIR_FILE}; the proxy attacker starts "
                   "from scratch (pass --privacy_attacker_state FILE to continue one)")
    return None


def resume(reg: PrivacyRegularizer, state_file: Path) -> int:
    """Restore the attacker saved in ``state_file`` into ``reg``; returns the step it continues from. Settings that
    differ from the saved ones are named by their kohya flags (:class:`StateError`, before anything changed)."""
    state = read_state(state_file)
    saved = config_from_state(state, state_file).algorithm_fields()
    mine = reg.config.algorithm_fields()
    differ = [k for k in mine if mine[k] != saved[k]]
    if differ:
        flags = ", ".join(f"{_flag(k, saved[k])} (this run: {_flag(k, mine[k])})" for k in differ)
        raise StateError(
            f"the attacker state {state_file} was saved with other privacy settings. To continue it, pass "
            f"{flags}; or start a new attacker (move {state_file} away, or drop --privacy_attacker_state). "
            "Nothing was trained.")
    reg.load_state_dict(state)
    logger.warning(
        f"SMP-LoRA: attacker state restored from {state_file} (step {reg.global_step}, "
        f"{reg.attacker_updates} attacker updates). smplora.metrics.step counts every step since the first "
        "run; kohya restarts its own count (ss_steps) on --resume unless --skip_until_initial_step is given, so "
        f"the two then differ by {reg.global_step}.")
    return reg.global_step


class Checkpoints:
    """What each save of a kohya run gets: the attacker state next to each LoRA checkpoint (:meth:`saved`) and in
    each ``--save_state`` folder (:meth:`save_state_hook`), the LoRA's header restored (:meth:`restore_header`)."""

    def __init__(self, reg: PrivacyRegularizer, args: Any, *, is_main: bool, num_processes: int,
                 header_plan: Optional[header.HeaderPlan]):
        self.reg = reg
        self.args = args
        self.is_main = is_main
        self.num_processes = num_processes
        self.header_plan = header_plan
        self._last: Optional[Tuple[Tuple[int, int, int], Path]] = None   # (counters, file) of the last save

    def restore_header(self, metadata: Dict[str, str]) -> Dict[str, str]:
        """kohya's ``ss_*`` keys as without the holdout block (only for runs with a header plan)."""
        return header.restore(metadata, self.header_plan, self.args, self.num_processes)

    def saved(self, ckpt_file: str) -> None:
        """After kohya saved ``ckpt_file``: the attacker state next to it (main process only); states whose
        checkpoint kohya has removed (``--save_last_n_steps`` / ``--save_last_n_epochs``) are dropped."""
        if not self.is_main:
            return
        path = state_path_for_checkpoint(ckpt_file)
        self.save(path)
        m = self.reg.metrics()
        logger.info(f"SMP-LoRA: attacker state saved to {path} (step {int(m['step'])}, attacker CE on members "
                    f"{m.get('attacker_ce_member', float('nan')):.4f}, attacker accuracy "
                    f"{m.get('attacker_acc', float('nan')):.3f})")
        for old in path.parent.glob(f"*{STATE_SUFFIX}"):
            stem = old.name[: -len(STATE_SUFFIX)]
            if old != path and not any((old.parent / f"{stem}{ext}").exists() for ext in CHECKPOINT_EXTS):
                old.unlink(missing_ok=True)

    def save_state_hook(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate's save-state pre-hook: the attacker state in kohya's ``--save_state`` folder."""
        if self.is_main:
            self.save(Path(output_dir) / STATE_DIR_FILE)

    def save(self, path: Path) -> None:
        """Save the attacker state to ``path``; when the same state (same step and attacker counters) was just
        saved elsewhere (a checkpoint and its ``--save_state`` folder at the same step), hard-link that file
        instead, so the two names share one copy on disk (a plain save where links are not possible)."""
        reg = self.reg
        counters = (reg.global_step, reg.attacker_updates, reg.attacker_steps)
        if self._last is not None and self._last[0] == counters and self._last[1].is_file():
            source = self._last[1]
            try:
                if path.resolve() != source.resolve():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(path.name + ".link-tmp")
                    tmp.unlink(missing_ok=True)
                    os.link(source, tmp)
                    os.replace(tmp, path)
                return
            except OSError:
                pass
        reg.save(path)
        self._last = (counters, path)


_FIELD_FLAGS = {field: name for name, (field, _, _) in CONFIG_OPTIONS.items()}


def _flag(field: str, value: Any) -> str:
    """A config field and value as the kohya option that sets it."""
    if field == "objective":
        return f"--privacy {'smplora' if value == 'smp' else 'mplora'}"
    if field == "calibrated":
        return "--privacy_calibrated" if value else "--no-privacy_calibrated"
    if field == "hidden":
        value = ",".join(str(v) for v in value)
    elif field == "feature_grid":
        value = 0 if value is None else ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
    return f"--{_FIELD_FLAGS.get(field, 'privacy_' + field)} {value}"
