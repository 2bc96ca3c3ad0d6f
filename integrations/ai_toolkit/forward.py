"""What the privacy term reads from an ai-toolkit forward: the target of the loss, rows of the inputs, the base
prediction with the LoRA switched off.

- :func:`loss_target`: the target ``SDTrainer.calculate_loss`` compares the prediction with, by the same rule
  (27a03a91): a prior prediction when one is passed (and not ``do_prior_divergence``), the velocity for
  v-prediction models, the model's own ``get_loss_target``, ``noise - latents`` for flow matching, else the noise.
  The options that change the prediction or the target inside ``calculate_loss`` are refused before training
  (:data:`.config.REFUSED_TRAIN_OPTIONS`), and :mod:`.source` checks these branches are still there;
- :func:`cut_rows`: the rows of a batch-leading value (tensors, lists of tensors, dicts, ai-toolkit's
  ``PromptEmbeds``), so the base forward runs on the privacy rows only;
- :func:`base_prediction`: the training forward's ``predict_noise`` call replayed on those rows under ``no_grad``
  with ``network.is_active`` off (the switch ai-toolkit's own prior prediction uses), the random streams put back.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from smplora_plugin.errors import SmploraError

from .holdout import restored_rng


def loss_target(trainer: Any, noise: torch.Tensor, batch: Any, timesteps: Any,
                prior_pred: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The target ``SDTrainer.calculate_loss`` uses for ``noise_pred`` (see the module docstring)."""
    tc, sd = trainer.train_config, trainer.sd
    has_mask = getattr(batch, "mask_tensor", None) is not None
    masked_prior = bool(getattr(tc, "inverted_mask_prior", False)) and prior_pred is not None and has_mask
    if not masked_prior:
        if prior_pred is not None and not getattr(tc, "do_prior_divergence", False):
            return prior_pred.detach()
        if getattr(sd, "prediction_type", None) == "v_prediction":
            return sd.noise_scheduler.get_velocity(batch.tensor, noise, timesteps)
    if hasattr(sd, "get_loss_target"):
        return sd.get_loss_target(noise=noise, batch=batch, timesteps=timesteps).detach()
    if getattr(sd, "is_flow_matching", False):
        return (noise - batch.latents).detach()
    return noise


def cut_rows(value: Any, idx: torch.Tensor, size: int) -> Any:
    """``value`` with every tensor of leading size ``size`` cut to the rows ``idx`` (a new object; the input is
    unchanged). Lists, tuples and dicts are cut item by item; an object holding tensors (ai-toolkit's
    ``PromptEmbeds``: text embeds, pooled embeds, attention mask) is copied with its tensor attributes cut."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx.to(value.device)) if value.ndim >= 1 and value.shape[0] == size else value
    if isinstance(value, (list, tuple)):
        return type(value)(cut_rows(v, idx, size) for v in value)
    if isinstance(value, dict):
        return {k: cut_rows(v, idx, size) for k, v in value.items()}
    if hasattr(value, "__dict__") and any(isinstance(v, (torch.Tensor, list, tuple)) for v in vars(value).values()):
        out = copy.copy(value)
        for key, item in vars(value).items():
            if isinstance(item, (torch.Tensor, list, tuple)):
                setattr(out, key, cut_rows(item, idx, size))
        return out
    return value


def base_prediction(trainer: Any, predict: Callable[..., torch.Tensor], call: Mapping[str, Any],
                    rows: Sequence[int], size: int) -> torch.Tensor:
    """The base model's prediction (LoRA off) at the training forward's inputs ``call`` (the arguments of its
    ``predict_noise``, by name), on ``rows`` of its ``size`` samples; ``predict`` is ``SDTrainer.predict_noise``
    bound to the trainer. Nothing of the trainer changes: the network's switch and the random streams are put
    back, and no gradient is recorded."""
    net = getattr(trainer, "network", None)
    if net is None or not hasattr(net, "is_active"):
        raise SmploraError("calibrated features (privacy.preset robust / privacy.calibrated) need a LoRA network "
                           "with ai-toolkit's is_active switch, and this process has none; add a network: block or "
                           "use privacy.preset paper.")
    idx = torch.tensor(list(rows), dtype=torch.long)
    cut = len(rows) != size or list(rows) != list(range(size))
    kwargs: Dict[str, Any] = {}
    for key, value in call.items():
        kwargs[key] = value if key == "batch" or not cut else cut_rows(value, idx, size)
    kwargs["is_primary_pred"] = False
    device = getattr(trainer, "device_torch", None)
    was = net.is_active
    with torch.no_grad(), restored_rng(device):
        net.is_active = False
        try:
            out = predict(**kwargs)
        finally:
            net.is_active = was
    if not isinstance(out, torch.Tensor) or out.shape[0] != len(rows):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SmploraError(f"the base prediction of calibrated features has shape {got} for {len(rows)} privacy "
                           f"row(s) of a batch of {size}: this model's predict_noise does not run on a cut batch. "
                           "Use privacy.preset paper (no base forward), or privacy.privacy_fraction: 1.")
    return out.detach()
