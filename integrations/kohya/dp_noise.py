"""DP noise in a kohya run (``--privacy dpsgd``, or SMP-LoRA + DP noise): the glue to the core's ``DPTraining``.

- :func:`check_args` (from :func:`.plan.plan_run`, before kohya's ``train()`` starts): fp16 loss scaling and
  DeepSpeed refused, and under SMP-LoRA + DP noise the kohya loss options whose per-sample loss the shim cannot
  reproduce;
- :func:`start` (at the first training step, before the shim writes anything): ``DPTraining`` on kohya's LoRA
  network, sized by kohya's own counts, the ``--resume`` folder's DP state continued, attached to kohya's optimiser;
- :func:`sample_losses`: each image's loss of a batch under SMP-LoRA + DP noise, checked to average to kohya's loss.

DP-SGD alone trains on kohya's loss untouched: kohya's ``networks.lora`` calls its ``lora_down`` / ``lora_up``
layers as modules, so the core's hooks see each image's gradient during kohya's own backward, and a pre-hook on the
optimiser's step replaces kohya's gradient by the clipped, noised one. No algorithm code here: it is the core's.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from smplora_plugin import __version__
from smplora_plugin.dp import DPError, DPTraining, check_mixed_precision

from .._common import summary_box
from . import data, reach

logger = logging.getLogger("smplora.kohya")

#: kohya options that change the loss of an image in a way the per-sample loss of SMP-LoRA + DP noise does not
#: reproduce (it is kohya's l2 loss with the forward's weighting and the batch's loss weights)
LOSS_OPTIONS = ("min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
                "debiased_estimation_loss", "masked_loss")


def check_args(settings: Any, args: Any) -> None:
    """The kohya options DP noise cannot work with, refused before kohya starts (:class:`DPError`, naming the fix)."""
    check_mixed_precision(getattr(args, "mixed_precision", None))
    if getattr(args, "full_fp16", False):
        check_mixed_precision("fp16")
    if getattr(args, "deepspeed", False):
        raise DPError("DP noise with --deepspeed: DeepSpeed steps its own optimiser on its own gradient buffers, so "
                      "the per-sample clipped, noised gradient could not replace kohya's. Train without --deepspeed.")
    if settings.objective is None:     # DP-SGD alone: kohya's own loss, whatever its options
        return
    given = [f"--{name} {getattr(args, name)!r}" for name in LOSS_OPTIONS if getattr(args, name, None)]
    loss_type = getattr(args, "loss_type", None) or "l2"
    if loss_type != "l2":
        given.append(f"--loss_type {loss_type!r}")
    if given:
        raise DPError(f"SMP-LoRA + DP noise trains each image's own SMP-LoRA term, so the shim computes each image's "
                      f"loss itself (kohya's l2 loss with its weighting and loss weights); it cannot reproduce "
                      f"{', '.join(given)}. Drop {'it' if len(given) == 1 else 'them'} (--loss_type l2), or train "
                      "DP-SGD alone with --privacy dpsgd, which uses kohya's own loss untouched.")


def start(settings: Any, args: Any, accelerator: Any, network: torch.nn.Module, reg: Any, rows: int,
          batch_per_device: int, state: Optional[Dict[str, Any]]) -> DPTraining:
    """``DPTraining`` for this run, before its first step: on kohya's (unwrapped) LoRA ``network``, ``rows`` member
    rows (kohya's images x repeats), a step of ``batch_per_device`` x accumulation x processes images, kohya's
    ``max_train_steps`` (after its epoch computation); the DP ``state`` of the ``--resume`` folder loaded (refused
    with other settings); attached to kohya's optimiser. Everything here can refuse before anything is written."""
    accumulation = int(getattr(accelerator, "gradient_accumulation_steps", None)
                       or getattr(args, "gradient_accumulation_steps", 1) or 1)
    processes = int(getattr(accelerator, "num_processes", 1) or 1)
    planned = getattr(args, "max_train_steps", None)
    dpt = DPTraining(network, settings.dp, dataset_size=rows, batch_size=batch_per_device * accumulation * processes,
                     planned_steps=planned if isinstance(planned, int) and planned > 0 else None,
                     backward_scale=1.0 / accumulation, capture="hooks", regularizer=reg)
    if state is not None:
        dpt.load_state_dict(state)
    dpt.attach(reach.training_optimizer(accelerator, dpt.dp.params))
    return dpt


def announce(settings: Any, dpt: DPTraining, resumed_steps: int) -> None:
    """The DP settings in a summary box, at the first step (main process)."""
    what = ("DP-SGD alone: kohya's own loss, no SMP-LoRA term (no attacker, no held-out forward)"
            if settings.objective is None else
            f"SMP-LoRA + DP noise: each image's own {settings.method} term (privacy fraction 1)")
    lines: List[str] = [f"DP noise (smplora-plugin {__version__}): {what}", *dpt.lines(),
                        "kohya's --max_grad_norm acts on kohya's own gradient, which the DP step discards",
                        "progress bar: eps = the epsilon so far, at the delta and sampling above"]
    if resumed_steps:
        lines.append(f"continued from a DP state of {resumed_steps} steps (--resume)")
    if data.is_main_process():
        print(summary_box(lines), flush=True)


def sample_losses(trainer: Any, pred: torch.Tensor, target: torch.Tensor, weighting: Any, batch: Any,
                  loss: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` losses of the batch's images as kohya's ``process_batch`` computes them before its batch mean
    (l2, times the forward's weighting, mean over each image, times ``batch["loss_weights"]``), refused unless
    their mean is kohya's ``loss`` (a trainer's own ``post_process_loss`` or a masked loss)."""
    batch = batch if isinstance(batch, dict) else {}
    if batch.get("alpha_masks") is not None:
        raise DPError("this batch carries alpha masks (a masked loss), which SMP-LoRA + DP noise does not reproduce "
                      "per image: drop alpha_mask from the dataset config, or train with --privacy dpsgd.")
    losses = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weighting is not None:
        losses = losses * weighting
    losses = losses.mean(dim=list(range(1, losses.ndim)))
    weights = batch.get("loss_weights")
    if isinstance(weights, torch.Tensor):
        losses = losses * weights.to(losses.device)
    kohya, mine = float(loss.detach()), float(losses.mean().detach())
    if not torch.allclose(losses.mean().detach(), loss.detach().float().reshape(()), rtol=1e-4, atol=1e-7):
        raise DPError(f"{type(trainer).__name__}'s loss of this batch ({kohya:.6g}) is not the mean of its images' "
                      f"l2 losses ({mine:.6g}): its post_process_loss or a loss option weights the images in a way "
                      "SMP-LoRA + DP noise does not reproduce. Train with --privacy dpsgd (kohya's own loss), or "
                      "without that weighting.")
    return losses
