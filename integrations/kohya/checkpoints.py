"""The proxy attacker's state on disk in a kohya run: continued before training, saved with every LoRA checkpoint.

- :func:`state_to_continue` / :func:`resume`: the state a run continues (``--privacy_attacker_state FILE``, else
  the one in the ``--resume`` folder), refused when it was saved with other privacy settings;
- :func:`dp_state_to_continue`: with DP noise, the DP state (accountant, noise generator) of the ``--resume``
  folder, refused before anything is built when it was saved with another sigma, clip, accountant or delta, and
  required (a resumed DP run without it would count its epsilon from step 0);
- :class:`Checkpoints` (built at the first training step): the state next to each LoRA checkpoint
  (``name.smplora_state`` next to ``name.safetensors``: safetensors format, without a ``.safetensors`` suffix so
  that LoRA pickers do not list it; with DP noise also ``name.smplora_dp``) and in each ``--save_state`` folder
  (``smplora_state.safetensors``, ``smplora_dp_state.safetensors``), and kohya's ``ss_*`` header in each saved
  LoRA as without the holdout block (:func:`.header.restore`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from smplora_plugin import PrivacyRegularizer
from smplora_plugin.dp import DPError, DPOptions, DPTraining, save_dp_state
from smplora_plugin.dp import read_dp_state as read_dp_state_file
from smplora_plugin.errors import StateError
from smplora_plugin.state import config_from_state, read_state

from . import header
from .options import CONFIG_OPTIONS, KohyaPrivacySettings

logger = logging.getLogger("smplora.kohya")

STATE_DIR_FILE = "smplora_state.safetensors"   # inside a kohya --save_state folder
STATE_SUFFIX = ".smplora_state"                # next to each LoRA checkpoint
DP_STATE_DIR_FILE = "smplora_dp_state.safetensors"   # the DP state (accountant, noise generator), same places
DP_STATE_SUFFIX = ".smplora_dp"
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt")


def state_path_for_checkpoint(ckpt_file: str) -> Path:
    """Where the attacker state of a LoRA checkpoint is saved: ``<ckpt without ext>.smplora_state``."""
    p = Path(ckpt_file)
    return p.with_name(p.stem + STATE_SUFFIX)


def dp_state_path_for_checkpoint(ckpt_file: str) -> Path:
    """Where the DP state of a LoRA checkpoint is saved: ``<ckpt without ext>.smplora_dp``."""
    p = Path(ckpt_file)
    return p.with_name(p.stem + DP_STATE_SUFFIX)


def write_dp_state(dpt: DPTraining, path: Path) -> Path:
    """``dpt.state_dict()`` as a safetensors file, atomically (the core's ``save_dp_state``)."""
    return save_dp_state(dpt, path)


def read_dp_state(path: Path) -> Dict[str, Any]:
    """The state dict of :func:`write_dp_state` (not yet checked against a run: ``DPTraining.load_state_dict``)."""
    return read_dp_state_file(path, "Resume from another --save_state folder, or start a new run.")


def dp_state_to_continue(settings: KohyaPrivacySettings, args: Any) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The DP state of kohya's ``--resume`` folder, checked against the run's DP options as far as they are known
    before training (sigma, clip, accountant, delta; the rest when it is loaded at the first step); ``None`` for a
    run that does not resume, or has no DP noise (a warning when the folder holds a DP state)."""
    resume_dir = getattr(args, "resume", None)
    if not resume_dir:
        return None
    opts = settings.dp
    candidate = Path(resume_dir) / DP_STATE_DIR_FILE
    if opts is None:
        if candidate.is_file():
            logger.warning(f"SMP-LoRA: --resume {resume_dir} was saved by a run with DP noise; this run adds none, "
                           f"so the LoRA it continues is no longer covered by that run's epsilon.")
        return None
    if getattr(args, "resume_from_huggingface", False):
        raise DPError("DP noise with --resume_from_huggingface: the DP state (accountant, noise generator) is read "
                      f"from the local --resume folder ({DP_STATE_DIR_FILE}); download the folder and pass --resume "
                      "DIR.")
    if not candidate.is_file():
        raise DPError(f"--resume {resume_dir} holds no {DP_STATE_DIR_FILE}: the accountant would start at step 0 "
                      "and the epsilon would not count the steps that trained the LoRA being resumed. Resume from "
                      "a --save_state folder of a DP run of smplora-kohya, or start a new run without --resume.")
    state = read_dp_state(candidate)
    check_dp_resume(opts, state, candidate)
    return candidate, state


def check_dp_resume(opts: DPOptions, state: Dict[str, Any], source: Path) -> None:
    """Refuse a resume with another sigma, clip, accountant or delta than the saved state's, naming the flags."""
    meta = json.loads(state["dp.meta"])
    acc = meta["accountant"]
    if opts.target_epsilon is not None:
        raise DPError(f"--privacy_target_epsilon with --resume: sigma would be chosen again for this run's steps "
                      f"alone, while the accountant in {source} continues. Pass the saved sigma instead: "
                      f"--privacy_noise_multiplier {meta.get('sigma')!r}.")
    differ = [("noise_multiplier", meta.get("sigma"), opts.noise_multiplier),
              ("max_grad_norm", meta.get("clip"), opts.max_grad_norm),
              ("dp_accountant", acc.get("mechanism"), opts.accountant)]
    if opts.delta is not None:
        differ.append(("dp_delta", acc.get("delta"), opts.delta))
    differ = [(name, saved, mine) for name, saved, mine in differ if saved != mine]
    if differ:
        flags = ", ".join(f"--privacy_{name} {saved} (this run: --privacy_{name} {mine})"
                          for name, saved, mine in differ)
        raise DPError(f"the DP state {source} was saved with other DP settings: a resumed run must keep them, or its "
                      f"epsilon is wrong. To continue it, pass {flags}; or start a new run without --resume. "
                      "Nothing was trained.")


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
    """What each save of a kohya run gets: the attacker state (``reg``) and the DP state (``dp``), when the run has
    them, next to each LoRA checkpoint (:meth:`saved`) and in each ``--save_state`` folder (:meth:`save_state_hook`),
    the LoRA's header restored (:meth:`restore_header`)."""

    def __init__(self, reg: Optional[PrivacyRegularizer], args: Any, *, is_main: bool, num_processes: int,
                 header_plan: Optional[header.HeaderPlan], dp: Optional[DPTraining] = None):
        self.reg = reg
        self.dp = dp
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
        kept = []
        if self.reg is not None:
            path = state_path_for_checkpoint(ckpt_file)
            self.save(path)
            kept.append(path)
            m = self.reg.metrics()
            logger.info(f"SMP-LoRA: attacker state saved to {path} (step {int(m['step'])}, attacker CE on members "
                        f"{m.get('attacker_ce_member', float('nan')):.4f}, attacker accuracy "
                        f"{m.get('attacker_acc', float('nan')):.3f})")
        if self.dp is not None:
            path = write_dp_state(self.dp, dp_state_path_for_checkpoint(ckpt_file))
            kept.append(path)
            logger.info(f"SMP-LoRA: DP state saved to {path} ({self.dp.summary()})")
        for path in kept:
            suffix = STATE_SUFFIX if path.name.endswith(STATE_SUFFIX) else DP_STATE_SUFFIX
            for old in path.parent.glob(f"*{suffix}"):
                stem = old.name[: -len(suffix)]
                if old != path and not any((old.parent / f"{stem}{ext}").exists() for ext in CHECKPOINT_EXTS):
                    old.unlink(missing_ok=True)

    def save_state_hook(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate's save-state pre-hook: the attacker and DP states in kohya's ``--save_state`` folder."""
        if not self.is_main:
            return
        if self.reg is not None:
            self.save(Path(output_dir) / STATE_DIR_FILE)
        if self.dp is not None:
            write_dp_state(self.dp, Path(output_dir) / DP_STATE_DIR_FILE)

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
