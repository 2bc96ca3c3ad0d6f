"""accelerate wiring of the diffusers shim: checkpoint hooks, the state file and the start-up summary.

Works with any object that has accelerate's ``Accelerator`` interface; accelerate itself is not imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import StateError
from smplora_plugin.integrations._common import summary_box
from smplora_plugin.regularizer import PrivacyRegularizer as CoreRegularizer
from smplora_plugin.state import read_state, save_state

from .holdout import HoldoutImages

STATE_FILENAME = "smplora_state.safetensors"
HOLDOUT_KEY = "shim.diffusers.holdout"   # the holdout cursor (JSON) inside the state file


def register_hooks(accelerator: Any, save: Callable[[str], Any], load: Callable[[str], None]) -> Tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` call ``save(dir)`` (main process only) and ``load_state(dir)``
    call ``load(dir)``; returns the two hook handles."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save(output_dir)

    def load_hook(models: list, input_dir: str) -> None:
        load(input_dir)

    return (accelerator.register_save_state_pre_hook(save_hook),
            accelerator.register_load_state_pre_hook(load_hook))


def save_checkpoint(core: CoreRegularizer, holdout: Optional[HoldoutImages], path: Path) -> Path:
    """Write the regulariser state and, with a holdout, its cursor to ``path`` (safetensors)."""
    state = core.state_dict()
    if holdout is not None:
        state[HOLDOUT_KEY] = json.dumps(holdout.state_dict(), sort_keys=True)
    return save_state(state, path)


def load_checkpoint(core: CoreRegularizer, holdout: Optional[HoldoutImages], path: Path) -> None:
    """Restore :func:`save_checkpoint` output, validated whole before anything changes."""
    if not path.is_file():
        raise StateError(
            f"checkpoint {path.parent} has no {path.name}: it was saved without --privacy (or by another tool). "
            "Resume it without --privacy, or start a new run with --privacy."
        )
    state = read_state(path)
    cursor: Optional[Mapping[str, Any]] = None
    if HOLDOUT_KEY in state:
        try:
            cursor = json.loads(state.pop(HOLDOUT_KEY))
        except ValueError as exc:
            raise StateError(f"{path} holds a corrupt holdout cursor ({exc}).") from exc
    if holdout is not None and cursor is not None:
        holdout.check_state(cursor)  # raises before any change
    core.load_state_dict(state)
    if holdout is not None and cursor is not None:
        holdout.load_state_dict(cursor)


def to_device(batch: Any, device: Optional[torch.device]) -> Any:
    """``batch`` (tensors, possibly in dicts / lists / tuples) moved to ``device``; unchanged for ``None``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def summary(config: Optional[PrivacyConfig], holdout: Optional[HoldoutImages], state_filename: str,
            dp_lines: Optional[List[str]] = None) -> str:
    """The start-up box ``reg.attach`` prints (like kohya's): method, settings, the held-out images and
    what the loss display and the trackers show; ``dp_lines`` (the DP noise, :func:`.dp.box_lines`) follow.
    ``config`` is ``None`` for DP-SGD alone."""
    from smplora_plugin import __version__

    if config is None:
        return summary_box([f"DP-SGD (smplora-plugin {__version__}); loss display: step_loss / train_loss stay the "
                            "script's denoising loss", *(dp_lines or [])])
    method = "SMP-LoRA" if config.objective == "smp" else "MP-LoRA (baseline)"
    lines = [f"{method} (smplora-plugin {__version__}): alpha={config.alpha:g}, beta={config.beta:g}, "
             f"k_steps={config.k_steps}, attacker lr {config.attacker_lr:g}"]
    if config.calibrated:
        lines.append("base-calibrated features: one extra no-grad UNet forward with the LoRA disabled "
                     "(reg.reference)")
    if config.privacy_fraction < 1 and not dp_lines:
        lines.append(f"privacy fraction {config.privacy_fraction:g}, taken over steps: step k's privacy term (and its "
                     f"forwards) uses the first ceil((k+1) f B) - ceil(k f B) images of its batch of B")
    if holdout is not None:
        checked = (f"checked against {holdout.train_checked} training images (no byte-identical file)"
                   if holdout.train_checked else "NOT checked against the training images (no --train_data_dir)")
        lines.append(f"non-members (NEVER trained on): {len(holdout)} images in {holdout.folder}, "
                     f"{holdout.batch_size} per process and step; {checked}")
    lines += ["loss display: step_loss / train_loss stay the script's denoising loss; the gradient is the "
              "regularised loss's (reg.step keeps the loss value)",
              "progress bar: mia_ce (attacker CE on members, higher = better hidden) and mia_acc (its "
              "balanced accuracy, 0.5 = chance); trackers: smplora/* (reg.log_dict)"]
    lines += dp_lines if dp_lines else [f"checkpoints: <checkpoint>/{state_filename}"]
    return summary_box(lines)
