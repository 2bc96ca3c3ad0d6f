"""DP-SGD wiring of the diffusers shim: the core's :class:`~smplora_plugin.dp.DPTraining` built from the script's
objects, its checkpoint file and its lines of the start-up box.

The mechanism (per-sample gradients by hooks on peft's ``lora_A`` / ``lora_B`` layers, clipping, the noise, the
accountant) is the core's (:mod:`smplora_plugin.dp`); this module only reads the script's batch geometry and
hands it over. Neither diffusers nor accelerate is imported.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from smplora_plugin.dp import DPError, DPOptions, DPTraining, check_mixed_precision, read_dp_state, save_dp_state

from .adapters import unwrap_model
from .args import option

DP_STATE_FILENAME = "smplora_dp_state.safetensors"
ATTACH_LINE = ("reg.attach(accelerator, holdout, model=unet, optimizer=optimizer, train_dataloader=train_dataloader)"
               " right after accelerator.prepare(...)")


def dataset_size(train_dataloader: Any) -> int:
    """``N``: the rows of the training set behind the (prepared) dataloader, ``len(train_dataloader.dataset)``."""
    dataset = getattr(train_dataloader, "dataset", None)
    try:
        n = len(dataset)
    except TypeError:
        raise DPError("DP noise needs the training set's size N for the accountant, but the dataloader's dataset has "
                      "no len() (a streaming / iterable dataset): use a map-style dataset.") from None
    if n < 1:
        raise DPError("the training set is empty: DP noise needs at least one training image.")
    return int(n)


def planned_steps(args: Any, train_dataloader: Any, accumulation: int) -> int:
    """The optimiser steps the run plans: ``--max_train_steps``, else ``--num_train_epochs`` times the steps of an
    epoch of the (prepared, per-process) dataloader, the scripts' own count."""
    steps = option(args, "max_train_steps")
    if steps is None:
        epochs = option(args, "num_train_epochs")
        if epochs is None:
            raise DPError("DP noise needs the planned optimiser steps: pass --max_train_steps (or --num_train_epochs).")
        steps = int(epochs) * math.ceil(len(train_dataloader) / accumulation)
    return int(steps)


def build(options: DPOptions, accelerator: Any, args: Any, *, model: Any, optimizer: Any, train_dataloader: Any,
          regularizer: Any = None) -> DPTraining:
    """The :class:`DPTraining` of a diffusers script, attached to its optimiser (hooks on the LoRA layers of
    ``model``, the optimiser step pre-hook that writes the noised gradient).

    ``B`` (the images of one optimiser step) is ``--train_batch_size`` x the accelerator's gradient accumulation x
    its processes; ``N`` is ``len(train_dataloader.dataset)``; accelerate divides the loss by the accumulation
    steps before backward (``backward_scale``). Everything is checked before any hook is registered.
    """
    missing = [name for name, value in (("model", model), ("optimizer", optimizer),
                                        ("train_dataloader", train_dataloader)) if value is None]
    if missing:
        raise DPError(f"DP noise needs the script's {', '.join(missing)}: {ATTACH_LINE}.")
    check_mixed_precision(getattr(accelerator, "mixed_precision", "no"))
    micro = option(args, "train_batch_size")
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise DPError(f"--train_batch_size {micro!r}: DP noise needs the script's per-process batch size (an int).")
    accumulation = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    world = int(getattr(accelerator, "num_processes", 1) or 1)
    network = unwrap_model(model, accelerator)
    if not isinstance(network, torch.nn.Module):
        raise DPError(f"model={type(model).__name__} is not a torch module: pass the peft-wrapped UNet / transformer.")
    dpt = DPTraining(network, options, dataset_size=dataset_size(train_dataloader), batch_size=micro * accumulation
                     * world, planned_steps=planned_steps(args, train_dataloader, accumulation),
                     backward_scale=1.0 / accumulation, capture="hooks", regularizer=regularizer)
    dpt.attach(optimizer)
    return dpt


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)``: each sample's mean squared error, whose mean is the scripts' ``F.mse_loss(pred, target)``."""
    return (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(1)


def box_lines(dpt: DPTraining, with_regularizer: bool, checkpoint_files: str) -> List[str]:
    """The DP lines of the start-up box."""
    lines = list(dpt.lines())
    if with_regularizer:
        lines.append("SMP-LoRA under DP noise: every sample has its own term (l_i / (beta + alpha CE_i + delta), or "
                     "l_i - alpha CE_i), CE_i from the attacker frozen for the step; privacy fraction not applied")
    else:
        lines.append("DP-SGD alone: no attacker; the script's loss is trained as it is")
    lines += ["the step's gradient is (clipped per-sample sum + noise) / B, written by an optimiser pre-hook; the "
              "script's --max_grad_norm clipping acts on the discarded plain gradient",
              "progress bar: eps (epsilon so far, with the sampling note above); trackers: smplora/epsilon, "
              "smplora/dp_steps, smplora/dp_grad_norm_median",
              f"checkpoints: {checkpoint_files}"]
    return lines


def save_state(dpt: DPTraining, path: Path) -> Path:
    """``dp.meta`` (header) and ``dp.rng`` (a tensor) to ``path``, a safetensors file, atomically."""
    return save_dp_state(dpt, path)


def read_state(path: Path) -> Dict[str, Any]:
    """The state :func:`save_state` wrote (checked by ``DPTraining.load_state_dict`` when loaded)."""
    return read_dp_state(path, "Resume from another checkpoint folder, or start a new run.")


def check_files(folder: Path, dp_on: bool, filename: str = DP_STATE_FILENAME) -> Optional[Path]:
    """The DP state file of a checkpoint, or ``None``; refuses a checkpoint whose DP-ness differs from the run's."""
    path = Path(folder) / filename
    if dp_on and not path.is_file():
        raise DPError(f"checkpoint {folder} has no {filename}: it was saved without DP noise, so its epsilon so far is "
                      "unknown. Resume it without --privacy_noise_multiplier / --privacy_target_epsilon, or start a "
                      "new run.")
    if not dp_on and path.is_file():
        meta = json.loads(read_state(path)["dp.meta"])
        raise DPError(f"checkpoint {folder} was saved with DP noise (sigma {meta.get('sigma')}, clip "
                      f"{meta.get('clip')}): resume it with the same --privacy_noise_multiplier and "
                      "--privacy_max_grad_norm, or its accounting is lost.")
    return path if dp_on else None


def resume_folder(args: Any) -> Optional[Path]:
    """The checkpoint ``--resume_from_checkpoint`` names, resolved as the diffusers scripts do (a folder name under
    ``--output_dir``, or ``latest``: the highest ``checkpoint-N``); ``None`` when there is none to resume."""
    wanted = option(args, "resume_from_checkpoint")
    out = option(args, "output_dir")
    if not wanted or out is None:
        return None
    if wanted != "latest":
        folder = Path(out) / os.path.basename(str(wanted))
    else:
        found = [d for d in os.listdir(out) if d.startswith("checkpoint")] if os.path.isdir(out) else []
        numbered = [d for d in found if d.split("-")[-1].isdigit()]
        if not numbered:
            return None
        folder = Path(out) / max(numbered, key=lambda d: int(d.split("-")[-1]))
    return folder if folder.is_dir() else None


def check_resume(dpt: DPTraining, args: Any, filename: str = DP_STATE_FILENAME) -> None:
    """Refuse, before the script writes anything (its trackers' config comes before ``accelerator.load_state``),
    a checkpoint to be resumed that was saved with other DP settings or without DP noise. The saved state is
    loaded to check it and the current one put back; ``accelerator.load_state`` loads it for real."""
    folder = resume_folder(args)
    if folder is None:
        return
    path = check_files(folder, True, filename)
    before = dpt.state_dict()
    dpt.load_state_dict(read_state(path))      # refuses other settings before it changes anything
    dpt.load_state_dict(before)
