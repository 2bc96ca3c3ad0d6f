"""A harder demo data set, generated in code: textured shapes with per-instance detail.

Each 16x16 grey image is one of 10 classes, a shape (circle, square, triangle, cross, ring)
filled with a texture family (stripes or dots), captioned ``"a striped circle"``. Within a
class every instance differs in position, size, stripe angle / period / phase or dot layout,
contrast and a smooth background pattern, all drawn from the instance's own seed. The caption
says little about that detail, so a model that fits a member's loss must memorise it: the
setting where membership leaks most (many bits per image, few shared with other images).

The LoRA has something new to learn: the public pool the base model is trained on holds only
striped shapes, so the base has never seen a dotted one (its caption encoder has never trained
the word "dotted"); the private pool holds all 10 classes. Utility is then measurable: the
base model's samples of the five dotted classes fail the classifier, a useful LoRA's pass. The
classifier (the utility metric) is trained on a separate pool with all classes.

Instance ``i`` of a pool is fully determined by ``(pool seed, i)``; the public, classifier and
private pools use disjoint seeds, and every image is identified by the SHA-256 of its pixels
(``textures:<hash>``), as the digits are.
"""

from __future__ import annotations

import hashlib
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError, HoldoutError, InputError
from .data import PRIVATE_SETS, DigitSet, DigitSplits, check_split_sizes

SHAPES = ("circle", "square", "triangle", "cross", "ring")
TEXTURES = ("striped", "dotted")
#: The caption encoder's vocabulary for this data set.
VOCAB = ("<pad>", "<unk>", "a") + TEXTURES + SHAPES
IMAGE_SIZE = 16
PUBLIC_POOL = 3000
PRIVATE_POOL = 500
CLASSIFIER_POOL = 3000
_PUBLIC_SEED, _PRIVATE_SEED, _CLASSIFIER_SEED = 1, 2, 3
#: Classes of the public pool: the striped ones (even labels); dotted shapes are new to the base.
PUBLIC_CLASSES = tuple(range(0, len(SHAPES) * len(TEXTURES), 2))


def caption_for(label: int) -> str:
    """Class ``label`` (0..9) -> ``"a striped circle"``: shape ``label // 2``, texture ``label % 2``."""
    label = int(label)
    if not 0 <= label < len(SHAPES) * len(TEXTURES):
        raise InputError(f"texture class labels are 0..{len(SHAPES) * len(TEXTURES) - 1}, got {label}.")
    return f"a {TEXTURES[label % 2]} {SHAPES[label // 2]}"


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.hypot(dx, dy) <= r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # apex up, base at +r
        return (dy >= -r) & (dy <= r) & (ax <= (dy + r) / 2)
    if shape == "cross":
        w = max(1.2, r / 3)
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if shape == "ring":
        d = np.hypot(dx, dy)
        return (d <= r) & (d >= 0.55 * r)
    raise InputError(f"unknown shape {shape!r}")


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One ``(size, size)`` uint8 image of class ``label`` whose instance detail comes from ``rng``."""
    shape, texture = SHAPES[label // 2], TEXTURES[label % 2]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = size / 2 - 0.5
    cx, cy = c + rng.uniform(-2, 2), c + rng.uniform(-2, 2)
    r = rng.uniform(0.3, 0.42) * size
    mask = _shape_mask(shape, xx - cx, yy - cy, r)
    if texture == "striped":
        theta, period, phase = rng.uniform(0, np.pi), rng.uniform(2.5, 5.0), rng.uniform(0, 2 * np.pi)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period + phase
        tex = 0.5 + 0.5 * np.tanh(3 * np.sin(u))
    else:
        n = rng.integers(8, 16)
        px, py = rng.uniform(cx - r, cx + r, n), rng.uniform(cy - r, cy + r, n)
        rad = rng.uniform(0.9, 1.5, n)
        d = np.hypot(xx[..., None] - px, yy[..., None] - py) / rad
        tex = np.clip(1.5 * np.exp(-d ** 2).sum(-1), 0, 1)
    lo, hi = rng.uniform(0.15, 0.35), rng.uniform(0.85, 1.0)
    fg = lo + (hi - lo) * tex
    # smooth per-instance background: a few random low-frequency waves
    bg = np.full((size, size), rng.uniform(0.0, 0.12))
    for _ in range(3):
        kx, ky, ph = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0, 2 * np.pi)
        bg += 0.04 * np.sin(kx * xx + ky * yy + ph)
    img = np.where(mask, fg, np.clip(bg, 0, 0.2))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_pool(n: int, seed: int, classes: Optional[Sequence[int]] = None) -> DigitSet:
    """``n`` instances, labels cycling through ``classes`` (default all 10), instance ``i`` drawn from ``(seed, i)``."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}.")
    classes = np.asarray(range(len(SHAPES) * len(TEXTURES)) if classes is None else list(classes))
    labels = classes[np.arange(n) % len(classes)]
    raw = np.stack([render(int(y), np.random.default_rng([seed, i])) for i, y in enumerate(labels)])
    ids = ["textures:" + hashlib.sha256(x.tobytes()).hexdigest()[:20] for x in raw]
    images = torch.from_numpy(raw.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    lab = torch.from_numpy(labels.astype(np.int64))
    return DigitSet(images, lab, ids, texts=[caption_for(int(y)) for y in labels])


def public_pool() -> DigitSet:
    """The fixed public pool the textures base model is trained on: striped shapes only."""
    return make_pool(PUBLIC_POOL, _PUBLIC_SEED, PUBLIC_CLASSES)


def classifier_pool() -> DigitSet:
    """The pool (all 10 classes, disjoint from the others) the utility classifier is trained on."""
    return make_pool(CLASSIFIER_POOL, _CLASSIFIER_SEED)


def make_splits(sizes: Mapping[str, int], *, seed: int = 0) -> DigitSplits:
    """Split the private pool by identity into the named sets (as :func:`smplora_plugin.demo.data.make_splits`)."""
    from ..holdout import split_by_identity

    check_split_sizes(sizes, PRIVATE_POOL)
    private = make_pool(PRIVATE_POOL, _PRIVATE_SEED)
    public = public_pool()
    clash = set(private.ids) & (set(public.ids) | set(classifier_pool().ids))
    if clash or len(set(private.ids)) != len(private):
        raise HoldoutError("texture pools are not disjoint by content; this is a bug in the generator.")
    pos = {s: i for i, s in enumerate(private.ids)}
    plan = {k: sizes[k] for k in PRIVATE_SETS if k in sizes}
    parts = split_by_identity(private.ids, plan, seed=seed, key="path")
    sets = {k: private.subset(sorted(pos[s] for s in parts[k])) for k in plan}
    return DigitSplits(public=public, sets=sets, seed=seed)


def class_names() -> List[str]:
    return [caption_for(i)[2:] for i in range(len(SHAPES) * len(TEXTURES))]
