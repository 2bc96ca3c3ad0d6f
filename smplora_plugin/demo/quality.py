"""Sample quality in a feature space the project trains and ships: a small digit classifier.

- :class:`DigitClassifier`: a two-conv CNN on 8x8 digits; its 64-d penultimate layer is the
  feature space.
- :func:`sample_digits`: deterministic DDIM sampling with classifier-free guidance.
- :func:`sample_quality`: classifier accuracy on samples generated for each label, and the
  Fréchet distance between the features of the samples and of real held-out digits.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .data import DigitSet
from .model import TinyLDM, caption_for

FEATURE_SPACE = "smplora demo digit classifier, 64-d penultimate layer"


class DigitClassifier(nn.Module):
    """``(N, 1, s, s)`` images in [-1, 1] -> ``classes`` logits; ``features()`` gives the 64-d embedding.

    ``image_size`` 8 and 10 classes are the digits; the textures data set uses 16; the emoji
    style classifier is RGB (``in_channels=3``) with 2 classes.
    """

    def __init__(self, image_size: int = 8, classes: int = 10, in_channels: int = 1):
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ConfigError(f"image_size must be even and >= 2, got {image_size}.")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (image_size // 2) ** 2, 64)
        self.head = nn.Linear(64, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(data: DigitSet, *, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> DigitClassifier:
    """Train the classifier on ``data`` (the public pool) with light shift augmentation."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(image_size=int(data.images.shape[-1]), classes=int(data.labels.max()) + 1,
                              in_channels=int(data.images.shape[1]))
    return fit_classifier(clf, data, epochs=epochs, batch_size=batch_size, lr=lr, generator=g,
                          name="digit classifier", progress=progress)


def fit_classifier(clf: nn.Module, data: DigitSet, *, epochs: int, batch_size: int, lr: float,
                   generator: torch.Generator, name: str, progress: bool = True, flip: bool = False) -> nn.Module:
    """Adam on cross-entropy over ``data`` with a random one-pixel shift per batch (and, with ``flip``,
    a horizontal flip of half the batches), every draw from ``generator``; returns ``clf`` frozen in eval mode."""
    from .train import _bar

    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    clf.train()
    bar = _bar(epochs, name, progress)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=generator)
        for i in range(0, len(data), batch_size):
            idx = perm[i:i + batch_size]
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(data.images[idx], shifts=(dy, dx), dims=(2, 3))
            if flip and bool(torch.rand(1, generator=generator) < 0.5):
                x = x.flip(3)
            loss = F.cross_entropy(clf(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.update(1)
    bar.close()
    clf.eval().requires_grad_(False)
    return clf


@torch.no_grad()
def classifier_accuracy(clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((clf(images).argmax(1) == labels).float().mean())


@torch.no_grad()
def sample_digits(model: TinyLDM, labels: torch.Tensor, *, steps: int = 20, guidance: float = 1.0, seed: int = 0,
                  adapter: bool = True, batch_size: int = 500,
                  captioner: Callable[[int], str] = caption_for) -> torch.Tensor:
    """Deterministic DDIM samples (eta 0) for ``labels`` (captioned by ``captioner``), with
    classifier-free guidance; images in [-1, 1]."""
    return sample_captions(model, [captioner(int(y)) for y in labels], steps=steps, guidance=guidance, seed=seed,
                           adapter=adapter, batch_size=batch_size)


@torch.no_grad()
def sample_captions(model: TinyLDM, captions: Sequence[str], *, steps: int = 20, guidance: float = 1.0,
                    seed: int = 0, adapter: bool = True, batch_size: int = 500) -> torch.Tensor:
    """Deterministic DDIM samples (eta 0), one per caption, with classifier-free guidance; images in [-1, 1]."""
    captions = list(captions)
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    T = model.cfg.num_train_timesteps
    abar = model.alphas_cumprod.double()
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    s = model.cfg.latent_size
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn((len(captions), model.cfg.latent_channels, s, s), generator=g)
    out = []
    null = model.text([""])
    with model.adapter(adapter):
        for b in range(0, len(captions), batch_size):
            x = x_all[b:b + batch_size]
            cond = model.text(captions[b:b + batch_size])
            both = torch.cat([null.expand(x.shape[0], -1, -1), cond])
            for i, t in enumerate(ts):
                if guidance == 1.0:  # plain conditional sampling: no unconditional pass needed
                    eps = model.predict(x, torch.full((x.shape[0],), t), cond)
                else:
                    e_u, e_c = model.predict(torch.cat([x, x]), torch.full((2 * x.shape[0],), t), both).chunk(2)
                    eps = e_u + guidance * (e_c - e_u)
                a = float(abar[t])
                a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
                x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
                x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            out.append(model.decode(x).clamp(-1, 1))
    return torch.cat(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"need two (N >= 2, D) feature arrays of equal D, got {a.shape} and {b.shape}.")
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@torch.no_grad()
def sample_quality(model: TinyLDM, clf: DigitClassifier, reference: DigitSet, *, per_label: int = 20,
                   steps: int = 20, guidance: float = 1.0, seed: int = 0, adapter: bool = True,
                   captioner: Callable[[int], str] = caption_for) -> Dict[str, float]:
    """Accuracy of ``clf`` on ``per_label`` samples of each class, and the Fréchet distance to ``reference``."""
    labels = torch.arange(clf.head.out_features).repeat_interleave(per_label)
    imgs = sample_digits(model, labels, steps=steps, guidance=guidance, seed=seed, adapter=adapter,
                         captioner=captioner)
    fd = frechet_distance(clf.features(imgs).numpy(), clf.features(reference.images).numpy())
    return {"classifier_accuracy": classifier_accuracy(clf, imgs, labels), "frechet_distance": fd,
            "n_samples": int(len(labels)), "n_reference": len(reference)}


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """``(N, 1, h, w)`` or ``(N, 3, h, w)`` in [-1, 1] -> one uint8 grid image (rows of ``nrow``;
    ``(H, W)`` grey or ``(H, W, 3)`` RGB)."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + 1), nrow * (w + 1)) + (() if c == 1 else (c,)), np.uint8)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte()
    x = (x[:, 0] if c == 1 else x.permute(0, 2, 3, 1)).numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = x[i]
    return grid
