"""SMP-LoRA / MP-LoRA under DP noise: the regulariser's objective, one sample at a time.

DP-SGD clips the gradient of each sample's own loss. The MP objective ``mean(l) - alpha mean(CE)``
is a mean over samples, so its per-sample term ``l_i - alpha CE_i`` gives exactly the batch
gradient. The SMP ratio ``mean(l) / (beta + alpha mean(CE) + delta)`` is not: its denominator
couples the samples (with it, one sample's data would rescale every other sample's clipped
gradient, and no per-sample bound would hold), and detaching it would drop the adversarial
gradient. Under DP each sample's gradient is that of its own ratio
``l_i / (beta + alpha CE_i + delta)``, ``CE_i`` the frozen attacker's member cross-entropy on
sample ``i``'s features: the batch objective for a batch of one, and the mean of per-sample
ratios for larger batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DPError


def smp_sample_loss(reg, loss: torch.Tensor, member_feats: torch.Tensor) -> torch.Tensor:
    """``loss / (beta + alpha CE + delta)`` (smp) or ``loss - alpha CE`` (mp) of ONE sample, attacker frozen.

    Call it inside a :meth:`DPGradients.accumulate` loss function (it is ``torch.func.vmap``-safe):
    ``loss`` is the sample's scalar adaptation loss, ``member_feats`` ``reg.features(pred, target)`` of
    the same forward (``(1, D)``). The attacker is not updated here: update it once per step, before
    accumulating, with ``reg.update_attacker(member_feats, nonmember_feats)`` on a no-grad forward of
    the batch (the order of ``reg.step``: attacker first, then the frozen attacker's CE).
    """
    attacker = getattr(reg, "attacker", None)
    if attacker is None:
        raise DPError("the regulariser has no attacker yet: call reg.update_attacker(member_feats, nonmember_feats) "
                      "before accumulating (with k_steps=0, reg.scores(member_feats) builds it).")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DPError("smp_sample_loss needs the scalar adaptation loss of one sample (reduce it with .mean()).")
    if not isinstance(member_feats, torch.Tensor) or member_feats.ndim != 2 or member_feats.shape[0] != 1 \
            or member_feats.shape[1] != attacker.in_features:
        shape = tuple(member_feats.shape) if isinstance(member_feats, torch.Tensor) else type(member_feats).__name__
        raise DPError(f"member_feats has shape {shape}: pass reg.features(pred, target) of the one sample, "
                      f"(1, {attacker.in_features}).")
    cfg = reg.config
    device = next(attacker.parameters()).device
    logits = attacker.frozen(member_feats.float().to(device))
    ce = F.cross_entropy(logits, torch.ones(1, dtype=torch.long, device=device)).reshape(())  # label 1 = member
    ada = loss.float().reshape(()).to(device)
    if cfg.objective == "smp":
        return ada / (cfg.beta + cfg.alpha * ce + cfg.delta)
    return ada - cfg.alpha * ce
