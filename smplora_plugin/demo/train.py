"""Training loops of the demo: base pretraining on the public pool, LoRA with or without SMP-LoRA.

Both loops are plain PyTorch. Every random draw (batches, timesteps, noise, caption dropout)
comes from a seeded ``torch.Generator``; the member batches of the LoRA loop come from their own
generator, so plain LoRA and SMP-LoRA see exactly the same member batches, timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, HoldoutError, InputError
from .data import DigitSet
from .model import TinyLDM


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_base(model: TinyLDM, data: DigitSet, *, steps: int = 3000, batch_size: int = 64, lr: float = 2e-3,
               p_uncond: float = 0.1, seed: int = 0, progress: bool = True) -> List[float]:
    """Pretrain the caption encoder and UNet on ``data`` (the public pool); returns the loss per step.

    Captions are replaced by the empty caption with probability ``p_uncond`` (classifier-free
    guidance needs the unconditional model). AdamW with a cosine learning-rate decay.
    """
    if steps < 1 or batch_size < 1:
        raise ConfigError("steps and batch_size must be >= 1.")
    g = torch.Generator().manual_seed(seed)
    model.train()
    params = list(model.text.parameters()) + list(model.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    z_all = model.encode(data.images)
    caps_all = data.captions
    T = model.cfg.num_train_timesteps
    losses: List[float] = []
    bar = _bar(steps, "base pretraining", progress)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        z0 = z_all[idx]
        drop = torch.rand(batch_size, generator=g) < p_uncond
        caps = ["" if d else caps_all[i] for i, d in zip(idx.tolist(), drop.tolist())]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, T, (batch_size,), generator=g)
        loss = F.mse_loss(model.predict(model.add_noise(z0, t, noise), t, caps), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    model.requires_grad_(False)
    return losses


@dataclass
class LoRAResult:
    """What a LoRA run returns: its loss history and, with a regulariser, the attacker metrics."""

    name: str
    losses: List[float] = field(default_factory=list)
    reg_metrics: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, last: int = 100) -> Dict[str, Any]:
        tail = self.losses[-last:]
        out: Dict[str, Any] = {"adaptation_loss_last": sum(tail) / max(1, len(tail)), "steps": len(self.losses),
                               "seconds": round(self.seconds, 1)}
        if self.reg_metrics:
            out["proxy_attacker"] = self.reg_metrics[-1]
        return out


def _base_pred(model: TinyLDM, reg: Any, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
    """The base model's prediction (LoRA off, no grad) when the regulariser uses calibrated features."""
    if not reg.config.calibrated:
        return None
    with torch.no_grad(), model.adapter(False):
        return model.predict(z_t, t, cond)


def train_lora(model: TinyLDM, members: DigitSet, *, steps: int, lr: float, batch_size: int, seed: int,
               reg: Optional[Any] = None, nonmembers: Optional[DigitSet] = None, name: str = "lora",
               progress: bool = True, flip: bool = False,
               targets: Optional[Callable[..., torch.Tensor]] = None, caption_dropout: float = 0.0,
               privacy_draws: int = 1) -> LoRAResult:
    """Fine-tune the LoRA already added to ``model`` (``model.add_lora``) on ``members``.

    With ``reg`` (a :class:`smplora_plugin.PrivacyRegularizer`), every step also runs a no-grad
    forward on a batch of ``nonmembers`` (the defense's held-out set) and optimises
    ``reg.step(loss, member_feats, nonmember_feats)``; without it, the plain adaptation loss.
    The privacy term (and, with calibrated features, the base forward) sees the first
    ``reg.privacy_rows(batch)`` members of each batch (``PrivacyConfig.privacy_fraction``, taken
    over steps: a step with none calls ``reg.step(loss, None)``) and non-member batches of
    ``reg.nonmember_rows(batch)``. ``flip``: each member is mirrored left-right with probability
    1/2 per draw (kohya's ``--flip_aug``, diffusers' ``--random_flip``); the coins come from their
    own generator, so batches, timesteps and noise are those of the same run without ``flip``.
    ``targets`` (distillation, e.g. ``benchmarks/distill.py``'s ``ShardTargets``): the loss is taken against
    ``targets(idx, z_t, t, cond)`` (the batch's member indices and the model's inputs) in place of the noise.
    ``caption_dropout`` (caption randomisation, kohya's ``--caption_dropout_rate``): each member's caption, and
    each non-member's in the defense's forward, is the empty caption with this probability per draw.
    ``privacy_draws`` ``K`` (noise multiplicity in the privacy term): each privacy row's features are the mean
    over ``K`` noise / timestep draws (the step's own and ``K - 1`` more, forwarded with grad; non-members
    likewise, without), so the proxy attacker and the privacy term read a less noisy loss map; the adaptation
    loss stays the step's own draw. Both levers draw from their own generators, so at their defaults a run's
    batches, timesteps and noise are unchanged.
    """
    import time

    if not model.has_lora():
        raise InputError("the model has no LoRA: call model.add_lora(...) first.")
    if reg is not None and nonmembers is None:
        raise HoldoutError("SMP-LoRA needs the defense's non-member set (nonmembers=...).")
    if reg is not None and targets is not None:
        raise ConfigError("distillation targets (targets=...) and SMP-LoRA (reg=...) do not combine here; pass one.")
    if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, (int, float)) \
            or not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"caption_dropout={caption_dropout!r} must be a probability in [0, 1), e.g. 0.3.")
    if isinstance(privacy_draws, bool) or not isinstance(privacy_draws, int) or privacy_draws < 1:
        raise ConfigError(f"privacy_draws={privacy_draws!r} must be a whole number >= 1 (1: the step's own draw).")
    if privacy_draws > 1 and reg is None:
        raise ConfigError("privacy_draws > 1 averages the privacy term's features: it needs reg= (SMP-LoRA).")
    t_start = time.time()
    g = torch.Generator().manual_seed(seed)             # member batches, t, noise: same with and without reg
    g_nm = torch.Generator().manual_seed(seed + 7919)    # non-member draws of the defense
    g_flip = torch.Generator().manual_seed(seed + 104_729)  # flip coins
    g_cap = torch.Generator().manual_seed(seed + 130_363)   # caption-dropout coins
    g_draw = torch.Generator().manual_seed(seed + 155_921)  # the privacy term's extra noise / timestep draws
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        z_m, c_m = model.encode(members.images), model.text(members.captions)
        z_mirror = model.encode(members.images.flip(-1)) if flip else None
        if nonmembers is not None:
            z_n, c_n = model.encode(nonmembers.images), model.text(nonmembers.captions)
        c_empty = model.text([""]) if caption_dropout > 0 else None

    def captions(cond: torch.Tensor) -> torch.Tensor:
        if c_empty is None:
            return cond
        drop = (torch.rand(len(cond), generator=g_cap) < caption_dropout).view(-1, *[1] * (cond.ndim - 1))
        return torch.where(drop, c_empty.expand_as(cond), cond)

    def mean_features(z0: torch.Tensor, cond: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor, z_t: torch.Tensor, grad: bool) -> torch.Tensor:
        feats = reg.features(pred, noise, t, reference=_base_pred(model, reg, z_t, t, cond))
        for _ in range(privacy_draws - 1):
            noise_k = torch.randn(z0.shape, generator=g_draw)
            t_k = torch.randint(0, T, (len(z0),), generator=g_draw)
            z_tk = model.add_noise(z0, t_k, noise_k)
            with torch.set_grad_enabled(grad):
                pred_k = model.predict(z_tk, t_k, cond)
            feats = feats + reg.features(pred_k, noise_k, t_k, reference=_base_pred(model, reg, z_tk, t_k, cond))
        return feats / privacy_draws
    T = model.cfg.num_train_timesteps
    bs = min(batch_size, len(members))
    nb = reg.nonmember_rows(bs) if reg is not None else bs
    res = LoRAResult(name)
    model.unet.train()
    bar = _bar(steps, f"LoRA ({name})", progress)
    for step in range(steps):
        idx = torch.randperm(len(members), generator=g)[:bs]
        z0 = z_m[idx]
        if z_mirror is not None:
            z0 = torch.where((torch.rand(bs, generator=g_flip) < 0.5).view(-1, 1, 1, 1), z_mirror[idx], z0)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, T, (bs,), generator=g)
        z_t = model.add_noise(z0, t, noise)
        cond = captions(c_m[idx])
        pred = model.predict(z_t, t, cond)
        loss = F.mse_loss(pred, noise if targets is None else targets(idx, z_t, t, cond))
        res.losses.append(loss.item())
        pb = reg.privacy_rows(bs) if reg is not None else 0
        if reg is not None and pb == 0:
            loss = reg.step(loss, None)
        elif reg is not None:
            member_feats = mean_features(z0[:pb], cond[:pb], pred[:pb], noise[:pb], t[:pb], z_t[:pb], grad=True)
            nonmember_feats = None
            if reg.wants_nonmembers():
                j = torch.randperm(len(nonmembers), generator=g_nm)[:nb]
                noise_n = torch.randn(z_n[j].shape, generator=g_nm)
                t_n = torch.randint(0, T, (len(j),), generator=g_nm)
                z_tn = model.add_noise(z_n[j], t_n, noise_n)
                cond_n = captions(c_n[j])
                with torch.no_grad():
                    pred_n = model.predict(z_tn, t_n, cond_n)
                    nonmember_feats = mean_features(z_n[j], cond_n, pred_n, noise_n, t_n, z_tn, grad=False)
            loss = reg.step(loss, member_feats, nonmember_feats)
        if reg is not None and (step % 10 == 0 or step == steps - 1):
            res.reg_metrics.append(reg.metrics())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        post = {"loss": f"{res.losses[-1]:.4f}"}
        if reg is not None and res.reg_metrics:
            post["att_acc"] = f"{res.reg_metrics[-1].get('attacker_acc', float('nan')):.2f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    bar.close()
    model.eval()
    res.seconds = time.time() - t_start
    return res
