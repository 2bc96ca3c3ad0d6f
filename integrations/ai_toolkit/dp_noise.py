"""DP noise in an ai-toolkit process (``privacy.method: dpsgd``, or SMP-LoRA + DP noise): the glue to the core's
:class:`~smplora_plugin.dp.DPTraining`.

- :func:`check_process` (in the process's ``__init__``, before ai-toolkit writes anything): the ai-toolkit options
  the mechanism cannot honour (fp16, ``gradient_accumulation_steps``, doubled captions, regularisation datasets,
  trained embeddings / adapters), refused naming the fix;
- :func:`training_rows`: ``N``, the training rows the accountant counts (images x ``num_repeats``);
- :func:`start` (at the first step): ``DPTraining`` on ai-toolkit's LoRA network, the resumed DP state loaded,
  attached to ai-toolkit's optimiser;
- :func:`write_state` / :func:`read_state` / :func:`check_saved_states`: the DP state (accountant, noise
  generator) next to each checkpoint's attacker state, and its settings checked before a resume;
- :func:`sample_losses`: each image's loss under SMP-LoRA + DP noise, checked to average to ai-toolkit's loss.

DP-SGD alone trains on ai-toolkit's loss untouched: its ``LoRAModule`` calls ``lora_down`` / ``lora_up`` as
modules, so the core's hooks see each image's gradient during ai-toolkit's own backward, and a pre-hook on the
optimiser's step replaces ai-toolkit's gradient by the clipped, noised one. No algorithm code here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from smplora_plugin import __version__
from smplora_plugin.dp import DPError, DPOptions, DPTraining, check_mixed_precision, read_dp_state, save_dp_state
from smplora_plugin.dp.accountant import opacus_accountant

from .config import BLOCK, FLAG, AitkPrivacySettings
from .holdout import walk_images

DP_STATE_SUFFIX = ".smplora_dp"     # safetensors, next to the attacker state in _smplora/


def check_process(config: Mapping[str, Any], mixed_precision: Any = None, accountant: str = "rdp") -> None:
    """Refuse, before anything is written, the process options DP noise cannot work with, and a Python without
    the accountant (Opacus) (:class:`DPError`, naming the fix)."""
    opacus_accountant(accountant)     # the core's import check: pip install 'smplora-plugin[dp]'
    train = config.get("train") or {}
    train = train if isinstance(train, Mapping) else {}
    check_mixed_precision(train.get("dtype"))
    check_mixed_precision(mixed_precision)
    steps = train.get("gradient_accumulation_steps", 1)
    if steps != 1:
        raise DPError(f"train.gradient_accumulation_steps={steps!r} with DP noise: the DP batch must be the images of "
                      "one optimiser step, and this legacy option (or -1, a whole epoch) spreads a step over several "
                      "hook_train_loop calls. Use train.gradient_accumulation: N instead (N batches, one step).")
    doubled = [k for k in ("short_and_long_captions", "merge_network_on_save") if train.get(k)]
    if doubled:
        raise DPError(f"train.{doubled[0]} with DP noise: " + (
            "each image is predicted twice in a batch, so its gradient would be clipped twice (a bound of 2C, "
            "not C)" if doubled[0] == "short_and_long_captions" else
            "checkpoints are merged full models, so a resume would continue the accountant on another model")
            + f". Remove train.{doubled[0]}.")
    regs = [i for i, d in enumerate(config.get("datasets") or []) if isinstance(d, Mapping) and d.get("is_reg")]
    if regs:
        raise DPError(f"datasets[{regs[0]}] is a regularisation dataset (is_reg) with DP noise: ai-toolkit draws its "
                      "batches on every other step, at a sampling rate the accountant does not count. Remove it "
                      "(or is_reg), or train without DP noise.")
    trained = [k for k in ("embedding", "adapter", "decorator") if config.get(k) is not None]
    if trained:
        raise DPError(f"this process also trains {', '.join(trained)}, whose gradients are not clipped or noised "
                      "(DP noise covers the LoRA network's lora_down / lora_up layers). Train the LoRA alone.")


def training_rows(datasets: Any, extensions: Sequence[str]) -> int:
    """``N``: the images of the training datasets (not ``is_reg``) times their ``num_repeats``, as ai-toolkit's
    dataset lists them (one row = one record of the accountant; a repeated image counts once per row)."""
    rows = 0
    for i, ds in enumerate(datasets or []):
        if not isinstance(ds, Mapping) or ds.get("is_reg"):
            continue
        source = ds.get("dataset_path") or ds.get("folder_path")
        path = Path(str(source)).expanduser() if source else None
        if path is None or not path.exists():
            raise DPError(f"datasets[{i}] has no existing folder_path ({source!r}): the accountant needs the number "
                          "of training images.")
        files = walk_images(path, extensions) if path.is_dir() else json.loads(path.read_text(encoding="utf-8"))
        repeats = ds.get("num_repeats", 1)
        rows += len(files) * (repeats if isinstance(repeats, int) and repeats > 1 else 1)
    if rows < 1:
        raise DPError("the process has no training images (datasets: with folder_path and no is_reg).")
    return rows


def start(trainer: Any, settings: AitkPrivacySettings, reg: Any, rows: int,
          state: Optional[Dict[str, Any]]) -> DPTraining:
    """``DPTraining`` for this process, before its first step: on ai-toolkit's LoRA ``network``, ``rows`` training
    rows, a step of ``train.batch_size x train.gradient_accumulation`` images (one process), the planned
    ``train.steps``; ai-toolkit's loss is a batch mean that its backward takes unscaled (``backward_scale`` 1).
    The resumed ``state`` is loaded (refused with other settings), then the optimiser attached."""
    tc = trainer.train_config
    network = getattr(trainer, "network", None)
    if not isinstance(network, torch.nn.Module):
        raise DPError(f"{type(trainer).__name__} has no LoRA network module at its first step: DP noise needs one.")
    batch = int(getattr(tc, "batch_size", 1) or 1) * int(getattr(tc, "gradient_accumulation", 1) or 1)
    planned = getattr(tc, "steps", None)
    dpt = DPTraining(network, settings.dp, dataset_size=rows, batch_size=batch,
                     planned_steps=planned if isinstance(planned, int) and planned > 0 else None,
                     backward_scale=1.0, capture="hooks", regularizer=reg)
    if state is not None:
        dpt.load_state_dict(state)
    dpt.attach(trainer.optimizer)
    return dpt


def lines(settings: AitkPrivacySettings, dpt: DPTraining, resumed_steps: int) -> List[str]:
    """The DP settings for the summary box printed at the first step."""
    what = ("DP-SGD alone: ai-toolkit's own loss, no SMP-LoRA term (no attacker, no held-out forward)"
            if settings.config is None else
            f"SMP-LoRA + DP noise: each image's own {settings.method} term (privacy fraction 1)")
    out = [f"DP noise (smplora-plugin {__version__}): {what}", *dpt.lines(),
           "train.max_grad_norm acts on ai-toolkit's own gradient, which the DP step discards",
           "progress bar: eps = the epsilon so far, at the delta and sampling above"]
    if resumed_steps:
        out.append(f"continued from a DP state of {resumed_steps} steps")
    return out


def state_path(state_dir: Path, checkpoint: str) -> Path:
    """Where the DP state of the checkpoint ``checkpoint`` (a path or a file stem) is saved."""
    return Path(state_dir) / f"{Path(checkpoint).stem}{DP_STATE_SUFFIX}"


def write_state(dpt: DPTraining, path: Path) -> Path:
    """``dpt.state_dict()`` as a safetensors file, atomically (the core's ``save_dp_state``)."""
    return save_dp_state(dpt, path)


def read_state(path: Path) -> Dict[str, Any]:
    """The state dict of :func:`write_state` (checked against the run by ``DPTraining.load_state_dict``)."""
    return read_dp_state(path, "Move it and its checkpoint away, or start a new job name.")


def check_saved_states(state_dir: Path, opts: DPOptions) -> None:
    """Refuse, before anything is written, DP states in the save root that a resume would continue with another
    sigma, clip, accountant or delta (or with a target epsilon, which would choose sigma again)."""
    for path in sorted(Path(state_dir).glob(f"*{DP_STATE_SUFFIX}")):
        meta = json.loads(read_state(path)["dp.meta"])
        acc = meta.get("accountant") or {}
        if opts.target_epsilon is not None:
            raise DPError(f"{FLAG}target_epsilon with a DP state to resume ({path}): sigma would be chosen again "
                          f"while the accountant continues. Pass the saved sigma instead: {FLAG}noise_multiplier: "
                          f"{meta.get('sigma')!r}; or move {Path(state_dir).parent} away to start a new run.")
        differ = [("noise_multiplier", meta.get("sigma"), opts.noise_multiplier),
                  ("max_grad_norm", meta.get("clip"), opts.max_grad_norm),
                  ("dp_accountant", acc.get("mechanism"), opts.accountant)]
        if opts.delta is not None:
            differ.append(("dp_delta", acc.get("delta"), opts.delta))
        differ = [d for d in differ if d[1] != d[2]]
        if differ:
            shown = ", ".join(f"{FLAG}{k}: saved {a!r}, this run {b!r}" for k, a, b in differ)
            raise DPError(f"the DP state {path} was saved with other DP settings ({shown}); a resume must keep them, "
                          f"or its epsilon is wrong. Use the saved settings, or move {Path(state_dir).parent} away "
                          "to start a new run. Nothing was trained.")


def sample_losses(pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` squared-error losses of the batch's images (mean over each image), refused unless their mean is
    ai-toolkit's ``loss`` of the batch (an SNR weighting, a mask, a loss type or a loss multiplier that
    SMP-LoRA + DP noise does not reproduce per image)."""
    losses = F.mse_loss(pred.float(), target.float(), reduction="none")
    losses = losses.mean(dim=list(range(1, losses.ndim)))
    if not torch.allclose(losses.mean().detach(), loss.detach().float().reshape(()), rtol=1e-4, atol=1e-7):
        raise DPError(f"ai-toolkit's loss of this batch ({float(loss.detach()):.6g}) is not the mean of its images' "
                      f"squared errors ({float(losses.mean().detach()):.6g}): a train option (snr_gamma, "
                      "min_snr_gamma, loss_type, a timestep weighting, masks, a dataset loss_multiplier) weights the "
                      "images in a way SMP-LoRA + DP noise does not reproduce. Train with "
                      f"{BLOCK}.method: dpsgd (ai-toolkit's own loss), or without that option.")
    return losses
