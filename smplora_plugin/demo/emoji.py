"""The ``emoji`` data set: 1,443 emoji drawn in two styles (Twemoji and Noto), a style-LoRA benchmark.

The shipped arrays (``assets/emoji/``, made once by ``scripts/emoji/make_emoji_dataset.py`` from the
npm packages ``emoji-datasource-{twitter,google}@16.0.0``; attributions in
``assets/emoji/ATTRIBUTION.md``) hold every kept emoji at 16 and 32 px, RGB on white, in both
styles, row ``i`` the same emoji in both. Captions come from the Unicode names and subcategories
(``"animal mammal water buffalo"``). Skin-tone variants, flags and the ``Component`` category are
left out and gender variants are merged to one emoji per variant group (see ``emoji.json``).

Design (the Pokemon-style LoRA on SD1.5, scaled down):

- a fixed partition (seed :data:`POOL_SEED`) splits the emoji into a **classifier pool**
  (:data:`CLASSIFIER_POOL` emoji, both styles) and the **candidate pool** (the other 1,243);
- the **base model** (public) learns the Noto style (:data:`BASE_STYLE`) from the candidate emoji:
  it knows every candidate concept, drawn the other way, as SD1.5 knows what the Pokemon LoRA draws;
- the **LoRA** learns the Twemoji style (:data:`LORA_STYLE`) from ``M`` members drawn (by seed)
  from the candidate pool; non-members are other candidate emoji in the Twemoji style, never
  trained on by anything (no Twemoji image of a candidate is in the base or the classifier);
- **utility**: the style classifier (a shipped asset trained on the classifier pool only) gives
  the share of generated samples in the LoRA's style at the members' captions and at unseen
  (non-member) captions (:func:`style_utility`), with a Fréchet and a kernel distance of the
  samples' classifier features to real unseen Twemoji images.

Every image is identified as ``emoji-<style>:<code points>``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .data import PRIVATE_SETS, DigitSet, DigitSplits, check_split_sizes

DATA_DIR = Path(__file__).resolve().parent / "assets" / "emoji"
STYLES = ("twitter", "google")
#: The style the public base model learns, and the style the LoRA learns from its members.
BASE_STYLE, LORA_STYLE = "google", "twitter"
#: Classifier labels: 1 = the LoRA's style, 0 = the base's.
STYLE_LABEL = {LORA_STYLE: 1, BASE_STYLE: 0}
RESOLUTIONS = (16, 32)
#: The demo's resolution (the frontier's too: 32 px costs 4x per step).
IMAGE_SIZE = 16
CLASSIFIER_POOL = 200
POOL_SEED = 0
#: Member counts of the benchmark; the candidate pool holds 2 x 512 members + non-members and the rest.
MEMBER_COUNTS = (32, 128, 512)
MAX_WORDS = 8


@functools.lru_cache(maxsize=1)
def table() -> Dict[str, Any]:
    """The parsed ``emoji.json``: provenance, selection rules and one row per emoji."""
    path = DATA_DIR / "emoji.json"
    if not path.is_file():
        raise InputError(f"{path} is missing: reinstall smplora-plugin, or rebuild it with "
                         "scripts/emoji/make_emoji_dataset.py.")
    return json.loads(path.read_text())


def captions() -> List[str]:
    """Every emoji's caption, in table order."""
    return [r["caption"] for r in table()["emoji"]]


def caption_for(index: int) -> str:
    """The caption of emoji ``index`` (its row in the table)."""
    caps = captions()
    if not 0 <= int(index) < len(caps):
        raise InputError(f"emoji indices are 0..{len(caps) - 1}, got {index}.")
    return caps[int(index)]


@functools.lru_cache(maxsize=1)
def vocab() -> Tuple[str, ...]:
    """The caption encoder's vocabulary: ``<pad>``, ``<unk>`` and every caption word (sorted)."""
    words = sorted({w for c in captions() for w in c.split()[:MAX_WORDS]})
    return ("<pad>", "<unk>") + tuple(words)


@functools.lru_cache(maxsize=len(RESOLUTIONS))
def _arrays(resolution: int) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if resolution not in RESOLUTIONS:
        raise ConfigError(f"emoji resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}.")
    return load_file(str(DATA_DIR / f"emoji_{resolution}px.safetensors"))


@functools.lru_cache(maxsize=1)
def pools() -> Dict[str, Tuple[int, ...]]:
    """The fixed partition of emoji rows: ``classifier`` and ``candidates`` (seed :data:`POOL_SEED`)."""
    from ..holdout import split_by_identity

    rows = table()["emoji"]
    pos = {r["unified"]: i for i, r in enumerate(rows)}
    parts = split_by_identity(sorted(pos), {"classifier": CLASSIFIER_POOL, "candidates": len(rows) - CLASSIFIER_POOL},
                              seed=POOL_SEED, key="path")
    return {k: tuple(sorted(pos[u] for u in v)) for k, v in parts.items()}


def load_rows(rows: Sequence[int], style: str, resolution: int = IMAGE_SIZE) -> DigitSet:
    """Emoji ``rows`` in ``style`` as a :class:`DigitSet`: ``(N, 3, r, r)`` in [-1, 1], style labels, captions."""
    if style not in STYLES:
        raise ConfigError(f"style must be one of {list(STYLES)}, got {style!r}.")
    rows = [int(i) for i in rows]
    arr = _arrays(resolution)[style][rows]
    images = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    meta = table()["emoji"]
    ids = [f"emoji-{style}:{meta[i]['unified']}" for i in rows]
    labels = torch.full((len(rows),), STYLE_LABEL[style], dtype=torch.long)
    return DigitSet(images, labels, ids, texts=[meta[i]["caption"] for i in rows])


SPLITS = ("base", "classifier", "candidates", "classifier_twitter")


def load_emoji(split: str, resolution: int = IMAGE_SIZE) -> DigitSet:
    """One fixed split: ``base`` (the candidate emoji in the base's Noto style: the public pool),
    ``classifier`` (the classifier pool in both styles, labels 1 = Twemoji), ``classifier_twitter``
    (its Twemoji half), or ``candidates`` (the candidate pool in the LoRA's Twemoji style)."""
    p = pools()
    if split == "base":
        return load_rows(p["candidates"], BASE_STYLE, resolution)
    if split == "candidates":
        return load_rows(p["candidates"], LORA_STYLE, resolution)
    if split == "classifier":
        return DigitSet.concat(load_rows(p["classifier"], LORA_STYLE, resolution),
                               load_rows(p["classifier"], BASE_STYLE, resolution))
    if split == "classifier_twitter":
        return load_rows(p["classifier"], LORA_STYLE, resolution)
    raise ConfigError(f"unknown emoji split {split!r}; choose one of {list(SPLITS)}.")


def public_pool() -> DigitSet:
    """What the base model is trained on (16 px)."""
    return load_emoji("base")


def classifier_pool() -> DigitSet:
    """What the style classifier is trained on (16 px, both styles of the classifier pool)."""
    return load_emoji("classifier")


def make_splits(sizes: Mapping[str, int], *, seed: int = 0, resolution: int = IMAGE_SIZE) -> DigitSplits:
    """Draw the private sets (members and non-members, Twemoji style) from the candidate pool with ``seed``.

    As the other demo data sets: ``sizes`` names sets of :data:`~smplora_plugin.demo.data.PRIVATE_SETS`;
    the draw uses the core's ``split_by_identity``; ``public`` is the base model's pool.
    """
    from ..holdout import split_by_identity

    cand = pools()["candidates"]
    check_split_sizes(sizes, len(cand), "emoji")
    pool = load_rows(cand, LORA_STYLE, resolution)
    pos = {s: i for i, s in enumerate(pool.ids)}
    plan = {k: sizes[k] for k in PRIVATE_SETS if k in sizes}
    parts = split_by_identity(pool.ids, plan, seed=seed, key="path")
    return DigitSplits(public=load_emoji("base", resolution),
                       sets={k: pool.subset(sorted(pos[s] for s in parts[k])) for k in plan}, seed=seed)


def draw_members(members: int, seed: int, *, nonmembers: Optional[int] = None, defense: int = 0,
                 resolution: int = IMAGE_SIZE) -> DigitSplits:
    """The benchmark's draw: ``members`` members, as many non-members (``nonmember_eval``, or
    ``nonmembers``) and ``defense`` defense non-members, all Twemoji, from the candidate pool by ``seed``."""
    sizes = {"member": members, "nonmember_eval": members if nonmembers is None else nonmembers}
    if defense:
        sizes["nonmember_defense"] = defense
    return make_splits(sizes, seed=seed, resolution=resolution)


# -- utility -------------------------------------------------------------------------------------

#: Epochs of the style classifier (it sees 400 images: 7 batches an epoch).
STYLE_CLASSIFIER_EPOCHS = 80


class StyleClassifier(torch.nn.Module):
    """Twemoji vs Noto on ``(N, 3, 16, 16)`` images in [-1, 1]: three 3x3 convs, then the mean and
    max over positions (style is local: outlines, shading, flat fills; the layout is the emoji's, not
    the style's), a 64-d feature layer (:meth:`features`, the distances' feature space) and 2 logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(width, 64, 3, padding=1)
        self.fc = torch.nn.Linear(128, 64)
        self.head = torch.nn.Linear(64, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.nn.functional.relu
        h = relu(self.conv3(relu(self.conv2(relu(self.conv1(x))))))
        return relu(self.fc(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_style_classifier(data: DigitSet, *, epochs: int = STYLE_CLASSIFIER_EPOCHS, batch_size: int = 64,
                           lr: float = 2e-3, seed: int = 0, progress: bool = True) -> StyleClassifier:
    """Train :class:`StyleClassifier` on ``data`` (labels 1 = Twemoji) with random one-pixel shifts
    and horizontal flips; deterministic for a ``seed``."""
    from .quality import fit_classifier

    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}.")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = StyleClassifier()
    return fit_classifier(clf, data, epochs=epochs, batch_size=batch_size, lr=lr, generator=g,
                          name="style classifier", progress=progress, flip=True)


@torch.no_grad()
def style_share(clf: Any, images: torch.Tensor) -> float:
    """Share of ``images`` the style classifier puts in the LoRA's (Twemoji) style."""
    return float((clf(images).argmax(1) == STYLE_LABEL[LORA_STYLE]).float().mean())


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3`` (KID's estimator)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"need two (N >= 2, D) feature arrays of equal D, got {a.shape} and {b.shape}.")
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m, n = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


@torch.no_grad()
def style_utility(model: Any, clf: Any, member_captions: Sequence[str], unseen: DigitSet, *, n: int = 100,
                  steps: int = 20, guidance: float = 1.0, seed: int = 0, adapter: bool = True) -> Dict[str, Any]:
    """The emoji LoRA's utility: generate ``n`` samples at the members' captions (cycled) and ``n`` at
    the captions of ``unseen`` (Twemoji images never trained on, cycled); report the share of each in
    the LoRA's style, and the Fréchet and kernel distances of all samples' classifier features to
    ``unseen``'s real images. ``classifier_accuracy`` is the style share over all samples (the
    classifier's accuracy with the LoRA's style as every sample's target)."""
    from .quality import frechet_distance, sample_captions

    if not member_captions or len(unseen) < 2 or n < 1:
        raise InputError("style_utility needs member captions, at least 2 unseen images and n >= 1.")
    mc = [member_captions[i % len(member_captions)] for i in range(n)]
    uc = [unseen.captions[i % len(unseen)] for i in range(n)]
    imgs = sample_captions(model, mc + uc, steps=steps, guidance=guidance, seed=seed, adapter=adapter)
    fs, fr = clf.features(imgs).numpy(), clf.features(unseen.images).numpy()
    at_m, at_u = style_share(clf, imgs[:n]), style_share(clf, imgs[n:])
    return {"classifier_accuracy": (at_m + at_u) / 2, "style_share_members": at_m, "style_share_unseen": at_u,
            "frechet_distance": frechet_distance(fs, fr), "kernel_distance": kernel_distance(fs, fr),
            "n_samples": 2 * n, "n_reference": len(unseen), "target_style": LORA_STYLE}


def load_base_model(folder: Optional[Path] = None):
    """The shipped emoji base model and style classifier ``(TinyLDM, StyleClassifier)``; ``None`` if
    they are missing or stale (``python -m smplora_plugin.demo.make_assets --dataset emoji``)."""
    from .pipeline import ASSETS, DemoConfig, load_assets

    return load_assets(DemoConfig(dataset="emoji"), ASSETS if folder is None else folder)
