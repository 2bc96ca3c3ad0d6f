"""Generation-based attack (Carlini et al., USENIX Security 2023 style; Pang & Wang, NDSS 2025).

For each candidate's caption (without captions: one shared unconditional pool) the LoRA model
and the base model (adapter off) each generate images by deterministic DDIM from the same seeded
noise. The score is ``d_base - d_lora`` (high = member), where ``d`` is the distance from the
candidate to its nearest generated sample, in one of three spaces chosen on the calibration
split: pixels (decoded; latents when the target cannot decode), a fixed random-init conv net
defined in code, and a low-frequency DCT descriptor. Nothing is downloaded.

The attack also keeps, per audited sample, its nearest LoRA-generated sample and the mean squared
difference to it (:class:`NearestGenerated`): the report's exposure view (:mod:`..exposure`)
shows the most exposed members next to them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import ScoreContext
from ..target import has_capability
from .base import Attack

PER_CAPTION = 8  # generated samples per distinct caption (per model)
POOL = 64  # unconditional pool size when there are no captions
STEPS = 10  # DDIM steps
NEAREST_KEY = "generation:nearest"  # the score context's cache key of the kept NearestGenerated
THUMBNAIL = 256  # kept images are area-pooled to at most this many pixels per side (for display only)


@dataclass
class NearestGenerated:
    """Per audited sample (the score context's order): its nearest LoRA-generated sample at its caption.

    ``space``: ``"pixels"`` (decoded, in [-1, 1]) or ``"latents"`` (the target cannot decode). ``mse``
    ``(N,)``: the mean squared difference between the sample and its nearest LoRA sample in that space,
    at the audit's resolution (the generation attack's pixel-space nearest neighbour). ``images``: the
    audited images, ``nearest``: those LoRA samples, as uint8 thumbnails (:func:`thumbnail`); with
    ``space == "latents"``, ``nearest`` holds the float latents. ``generated``: LoRA samples per
    caption (or in the shared unconditional pool).
    """

    space: str
    mse: np.ndarray
    images: torch.Tensor
    nearest: torch.Tensor
    generated: int


def thumbnail(x: torch.Tensor, side: int = THUMBNAIL) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [-1, 1] as uint8 ``[0, 255]``, area-pooled to at most ``side`` per side."""
    x = x.detach().float().cpu()
    if x.ndim == 4 and max(x.shape[-2:]) > side:
        f = max(x.shape[-2:]) / side
        x = F.adaptive_avg_pool2d(x, (max(1, round(x.shape[-2] / f)), max(1, round(x.shape[-1] / f))))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def ddim_sample(target: Any, noise: torch.Tensor, cond: Any, abar: torch.Tensor, steps: int, *, adapter: bool,
                clip: Optional[float] = None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``noise`` at t = T-1 down to a clean latent, with ``target.eps``.

    ``steps`` timesteps evenly spaced in [T-1, 0]; ``clip`` bounds the predicted clean latent
    (needed when abar(T-1) is tiny, as with cosine schedules).
    """
    T = abar.numel()
    ts = sorted({int(round(x)) for x in np.linspace(T - 1, 0, max(1, int(steps)))}, reverse=True)
    z = noise.float()
    x0 = z
    for i, t in enumerate(ts):
        tt = torch.full((z.shape[0],), t, dtype=torch.long)
        e = torch.as_tensor(target.eps(z, tt, cond, adapter=adapter)).float().cpu()
        a = float(abar[t])
        x0 = (z - math.sqrt(1 - a) * e) / math.sqrt(a)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
    return x0


class RandomConvFeatures:
    """A fixed, seeded random-init conv net (3x3 conv 32 -> ReLU -> 3x3 stride-2 conv 64 -> ReLU -> 4x4 pool)."""

    def __init__(self, channels: int, seed: int = 0):
        g = torch.Generator().manual_seed(int(seed))
        self.w1 = torch.randn((32, channels, 3, 3), generator=g) * math.sqrt(2.0 / (9 * channels))
        self.w2 = torch.randn((64, 32, 3, 3), generator=g) * math.sqrt(2.0 / (9 * 32))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x.float(), self.w1, padding=1))
        h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
        h = F.adaptive_avg_pool2d(h, (min(4, h.shape[-2]), min(4, h.shape[-1])))
        return h.flatten(1)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``(n, n)``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.float()


def dct_descriptor(x: torch.Tensor, keep: int = 8) -> torch.Tensor:
    """The ``keep x keep`` lowest-frequency 2D DCT coefficients of every channel, flattened."""
    x = x.float()
    H, W = x.shape[-2:]
    c = dct_matrix(H)[:min(keep, H)] @ x @ dct_matrix(W)[:min(keep, W)].T
    return c.flatten(1)


def _spaces(channels: int, seed: int) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    conv = RandomConvFeatures(channels, seed)
    return {"pixels": lambda x: x.float().flatten(1), "random-conv features": conv, "dct": dct_descriptor}


def _group_seed(caption: str, seed: int) -> int:
    return (zlib.crc32(caption.encode("utf-8")) ^ (int(seed) * 2654435761)) & 0x7FFFFFFF


def generated_distances(ctx: ScoreContext, per_caption: int = PER_CAPTION, pool: int = POOL,
                        steps: int = STEPS) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{space: (d_lora (N,), d_base (N,))}``: each sample's distance to its nearest generated sample.

    Samples with the same caption share one set of generated samples (``per_caption`` per model;
    without captions one pool of ``pool``). Noise is seeded by the caption text and the audit
    seed, and the base model gets the very same noise. Space ``pixels`` is decoded images when
    the target has ``decode``, the latents otherwise (then the other spaces see latents too).
    """
    target = ctx.target
    decode = has_capability(target, "decode")
    space_name = "pixels" if decode else "latents"

    kept: Dict[str, NearestGenerated] = {}

    def compute() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        real = ctx.images.float() if decode else ctx.latents
        if real.ndim != 4:
            real = real.reshape(real.shape[0], 1, 1, -1)
        spaces = _spaces(real.shape[1], ctx.config.seed)
        real_f = {k: f(real) for k, f in spaces.items()}
        clip = 1.5 * float(ctx.latents.abs().max()) or None
        groups: Dict[str, List[int]] = {}
        caps = ctx.captions if ctx.captions is not None else [""] * ctx.n
        for i, c in enumerate(caps):
            groups.setdefault(c, []).append(i)
        n_gen = per_caption if ctx.captions is not None else pool
        out = {k: (np.zeros(ctx.n), np.zeros(ctx.n)) for k in spaces}
        mse = np.zeros(ctx.n)
        nearest: Optional[torch.Tensor] = None
        bar = ctx.bar(len(groups) * 2, "generation")
        for cap, idx in groups.items():
            g = torch.Generator().manual_seed(_group_seed(cap, ctx.config.seed))
            noise = torch.randn((n_gen, *ctx.latents.shape[1:]), generator=g)
            cond = ctx.cond(slice(0, n_gen), [cap] * n_gen)
            for j, adapter in enumerate((True, False)):
                z = ddim_sample(target, noise, cond, ctx.abar, steps, adapter=adapter, clip=clip)
                gen = target.decode(z).float().cpu().clamp(-1, 1) if decode else z
                if gen.ndim != 4:
                    gen = gen.reshape(gen.shape[0], 1, 1, -1)
                for k, f in spaces.items():
                    d = torch.cdist(real_f[k][idx].double(), f(gen).double())  # (len(idx), n_gen)
                    out[k][j][idx] = d.min(1).values.numpy()
                    if adapter and k == "pixels":  # the nearest LoRA sample, kept for the exposure view
                        near = gen[d.argmin(1)]
                        near = thumbnail(near) if decode else near.float().cpu()
                        if nearest is None:
                            nearest = torch.zeros((ctx.n, *near.shape[1:]), dtype=near.dtype)
                        nearest[idx] = near
                        mse[idx] = d.min(1).values.pow(2).numpy() / real_f[k].shape[1]
                bar.update(1)
        bar.close()
        kept["nearest"] = NearestGenerated("pixels" if decode else "latents", mse, thumbnail(ctx.images), nearest,
                                           n_gen)
        ctx.passes["generation"] = ctx.passes.get("generation", 0) + 2 * len(groups) * n_gen * steps
        return {(space_name if k == "pixels" else k): v for k, v in out.items()}

    # views=False: the generated samples do not depend on the mirrored view, and the distances are kept as one
    # set (with flip_average the per-view dicts were not averageable)
    out = ctx.cached(f"generation:{per_caption}:{pool}:{steps}", compute, views=False)
    if kept:  # computed just now; the first settings computed are the ones kept
        ctx.cached(NEAREST_KEY, lambda: kept["nearest"], views=False)
    return out


def kept_nearest(ctx: ScoreContext) -> Optional[NearestGenerated]:
    """The :class:`NearestGenerated` the generation attack kept in ``ctx``, or ``None`` when it did not run."""
    return ctx.cached(NEAREST_KEY, lambda: None, views=False) if ctx.is_cached(NEAREST_KEY) else None


class GenerationAttack(Attack):
    """Nearest-neighbour distance to the LoRA's generations minus that to the base model's (same seeds).

    Options: ``per_caption`` (default :data:`PER_CAPTION`), ``pool`` (:data:`POOL`), ``steps``
    (:data:`STEPS`). The distance space is chosen on calibration.
    """

    name = "generation"
    title = "Generation (NN distance to LoRA vs base samples)"

    def candidates(self, ctx):
        o = self.options
        d = generated_distances(ctx, o.get("per_caption", PER_CAPTION), o.get("pool", POOL), o.get("steps", STEPS))
        return {space: d_base - d_lora for space, (d_lora, d_base) in d.items()}

    def curves(self, ctx):
        o = self.options
        d = generated_distances(ctx, o.get("per_caption", PER_CAPTION), o.get("pool", POOL), o.get("steps", STEPS))
        return {"uncalibrated_lora_distance": {space: -d_lora for space, (d_lora, _) in d.items()}}


__all__ = ["GenerationAttack", "NearestGenerated", "RandomConvFeatures", "dct_descriptor", "dct_matrix", "ddim_sample",
           "generated_distances", "kept_nearest", "thumbnail"]
