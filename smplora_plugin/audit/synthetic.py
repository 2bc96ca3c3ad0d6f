"""A known-answer audit target: an analytic denoiser that memorised a set of training samples.

``MemorizingTarget`` needs no training and no weights, so it checks the attack suite in seconds:
with ``strength=1`` the "adapted" model is the ideal denoiser of the empirical distribution of its
members (a perfect memoriser: every attack should reach AUC near 1); with ``strength=0`` it equals
the base model, the ideal denoiser of a Gaussian prior (every attack must sit at chance).
In between, its prediction is the ``strength``-weighted mix of the two.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, List, Optional, Sequence

import torch


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DDPM linear-beta schedule's cumulative alphas, ``(T,)`` (fp32 unless ``dtype``)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dtype)


class MemorizingTarget:
    """:class:`~.target.AuditTarget` whose adapter memorised ``members`` (pixel space, no VAE).

    ``captions`` (optional, one per member) make it text-conditional: a caption that equals a
    member's caption restricts the memorised mixture to those members, any other caption
    (reduced, null) uses all members. ``prior_std`` is the per-pixel std of the base model's
    Gaussian prior.
    """

    prediction_type = "epsilon"

    def __init__(self, members: torch.Tensor, *, captions: Optional[Sequence[str]] = None, strength: float = 1.0,
                 prior_std: float = 0.58, num_train_timesteps: int = 1000):
        self.members = members.float().flatten(1)  # (K, D)
        self.shape = tuple(members.shape[1:])
        self.member_captions = None if captions is None else [str(c) for c in captions]
        self.strength = float(strength)
        self.prior_var = float(prior_std) ** 2
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = linear_alphas_cumprod(self.num_train_timesteps)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        return None if captions is None else [str(c) for c in captions]

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        z = z_t.float().flatten(1)
        a = self.alphas_cumprod[torch.as_tensor(t).long().reshape(-1).expand(z.shape[0])].double()[:, None]
        zd = z.double()
        x_prior = (a.sqrt() * self.prior_var / (a * self.prior_var + 1 - a)) * zd
        if adapter and self.strength > 0:
            x_mem = self._mixture(zd, a, cond)
            x0 = self.strength * x_mem + (1 - self.strength) * x_prior
        else:
            x0 = x_prior
        eps = (zd - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.float().reshape(z_t.shape)

    def _mixture(self, z: torch.Tensor, a: torch.Tensor, cond: Any) -> torch.Tensor:
        m = self.members.double()  # (K, D)
        d2 = (z[:, None, :] - a.sqrt()[:, :, None] * m[None]).pow(2).sum(-1)  # (B, K)
        logits = -d2 / (2 * (1 - a))
        if cond is not None and self.member_captions is not None:
            mask = torch.tensor([[mc == c for mc in self.member_captions] for c in cond], dtype=torch.bool)
            has = mask.any(1, keepdim=True)
            logits = torch.where(has & ~mask, torch.full_like(logits, -math.inf), logits)
        w = torch.softmax(logits, 1)
        return w @ m


class FormulaTarget:
    """A nonlinear denoiser of known formula, in float64, for golden (hand-computed) tests.

    ``eps(z, t, c) = sqrt(1 - a_t) * z + sqrt(a_t) * tanh(W z + b + v(c))`` on the flattened
    latent (pixel space, no VAE), with ``a_t`` the linear-beta schedule's cumulative alpha,
    ``W = W0 + dW`` with the adapter and ``W0`` without, and ``v(c)`` the sum of the caption's
    word vectors (:meth:`word_vector`; the null caption adds nothing). All parameters are drawn
    from ``seed``. Unlike a linear denoiser, SecMI's t-error and SimA's norm rank samples
    differently here.
    """

    prediction_type = "epsilon"

    def __init__(self, shape: Sequence[int] = (1, 4, 4), *, seed: int = 0, weight_scale: float = 1.5,
                 adapter_scale: float = 0.5, word_scale: float = 0.3, num_train_timesteps: int = 1000):
        self.shape = tuple(shape)
        d = int(math.prod(self.shape))
        g = torch.Generator().manual_seed(int(seed))
        self.W0 = torch.randn((d, d), generator=g, dtype=torch.float64) * (weight_scale / math.sqrt(d))
        self.dW = torch.randn((d, d), generator=g, dtype=torch.float64) * (adapter_scale / math.sqrt(d))
        self.b = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
        self.word_scale = float(word_scale)
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = linear_alphas_cumprod(self.num_train_timesteps, dtype=torch.float64)

    def word_vector(self, word: str) -> torch.Tensor:
        """The fixed ``(D,)`` vector of ``word`` (seeded by its CRC-32)."""
        g = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
        return torch.randn(self.W0.shape[0], generator=g, dtype=torch.float64) * self.word_scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.double()

    def condition(self, captions: Optional[Sequence[str]]) -> Any:
        d = self.W0.shape[0]
        if captions is None:
            return None
        return torch.stack([sum((self.word_vector(w) for w in str(c).split()), torch.zeros(d, dtype=torch.float64))
                            for c in captions])

    @torch.no_grad()
    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        z = z_t.double().flatten(1)
        a = self.alphas_cumprod[torch.as_tensor(t).long().reshape(-1).expand(z.shape[0])][:, None]
        W = self.W0 + self.dW if adapter else self.W0
        h = z @ W.T + self.b + (0 if cond is None else cond)
        return ((1 - a).sqrt() * z + a.sqrt() * torch.tanh(h)).reshape(z_t.shape)


def synthetic_pool(n: int, shape: Sequence[int] = (1, 8, 8), *, seed: int = 0) -> torch.Tensor:
    """``n`` i.i.d. images uniform in [-1, 1] (a pool to split into members and non-members)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand((n, *shape), generator=g) * 2 - 1


def synthetic_captions(n: int, *, seed: int = 0) -> List[str]:
    """One distinct caption per sample ("a photo of item 0417 with a red texture" style).

    Item numbers are a seeded permutation with a fixed width, so a caption's length or digits
    carry nothing about its position (a split by position stays unbiased for the blind baseline).
    """
    g = torch.Generator().manual_seed(int(seed) + 7)
    colours = ["red", "green", "blue", "grey", "gold", "white"]
    idx = torch.randint(0, len(colours), (n,), generator=g).tolist()
    items = torch.randperm(n, generator=g).tolist()
    width = max(4, len(str(n)))
    return [f"a photo of item {items[i]:0{width}d} with a {colours[c]} texture" for i, c in enumerate(idx)]
