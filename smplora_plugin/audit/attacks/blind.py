"""The blind baseline: no model access; it must sit at chance, or the split is biased."""

from __future__ import annotations

import string
from typing import List

import numpy as np
import torch

from .base import CrossFitted

N_BANDS = 8


def frequency_bands(images: torch.Tensor, bands: int = N_BANDS) -> np.ndarray:
    """``(N, C * bands)`` log energy of each channel in ``bands`` equal-width radial FFT bands.

    Computed at full resolution (the mean of each channel removed), so a texture or noise change
    that pooling would average away still shows.
    """
    x = images.double()
    x = x - x.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2)  # (N, C, H, W)
    H, W = x.shape[-2:]
    fy, fx = torch.fft.fftfreq(H, dtype=torch.float64), torch.fft.fftfreq(W, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / (0.5 * np.sqrt(2))  # 0 .. 1
    which = torch.clamp((r * bands).long(), max=bands - 1)
    out = []
    for b in range(bands):
        mask = which == b
        e = power[..., mask].mean(-1) if bool(mask.any()) else torch.zeros(power.shape[:2], dtype=torch.float64)
        out.append(torch.log(e / (H * W) + 1e-12))
    return torch.stack(out, -1).flatten(1).numpy()


def caption_statistics(captions: List[str]) -> np.ndarray:
    """``(N, 6)``: words, characters, mean word length, digits, upper-case letters, punctuation."""
    rows = []
    for c in captions:
        words = c.split()
        rows.append([len(words), len(c), np.mean([len(w) for w in words]) if words else 0.0,
                     sum(ch.isdigit() for ch in c), sum(ch.isupper() for ch in c),
                     sum(ch in string.punctuation for ch in c)])
    return np.asarray(rows, dtype=np.float64)


class BlindBaseline(CrossFitted):
    """No model access: logistic regression on downsampled pixels, full-resolution frequency-band
    energies, and (with captions) caption words and caption statistics.

    It must sit at chance; anything else means members and non-members differ in distribution
    (split bias), and every attack's numbers are inflated by it.
    """

    name = "blind"
    title = "Blind baseline (pixels, frequency bands, captions; no model)"
    uses_model = False

    def features(self, ctx):
        parts = [ctx.pixels(), frequency_bands(ctx.images)]
        if ctx.captions is not None:
            from sklearn.feature_extraction.text import HashingVectorizer

            words = HashingVectorizer(n_features=256, alternate_sign=False).transform(ctx.captions).toarray()
            parts += [words, caption_statistics(ctx.captions)]
        return np.concatenate(parts, 1)

    def make_model(self, seed):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
