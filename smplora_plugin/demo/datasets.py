"""The demo's data sets: each names its model shape, splits, public pool, captions and weight files.

- ``digits``: scikit-learn's 8x8 handwritten digits (:mod:`.data`), the default.
- ``textures``: 16x16 textured shapes generated in code (:mod:`.textures`), harder: every
  image carries instance detail its caption does not describe, and the base model has never
  seen half of the classes (dotted shapes), so the LoRA has something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

from .data import DigitSet, DigitSplits
from .model import TinyLDMConfig


@dataclass(frozen=True)
class DemoDataset:
    """What the demo needs to know about one data set."""

    name: str
    title: str
    model_config: TinyLDMConfig
    make_splits: Callable[..., DigitSplits]  # (sizes, *, seed) -> DigitSplits
    public_pool: Callable[[], DigitSet]
    captioner: Callable[[int], str]
    base_file: str
    classifier_file: str
    pool_tag: str
    #: what the utility classifier is trained on; ``None``: the public pool
    classifier_pool: Optional[Callable[[], DigitSet]] = None

    def classifier_data(self) -> DigitSet:
        return (self.classifier_pool or self.public_pool)()

    def splits(self, sizes: Mapping[str, int], seed: int) -> DigitSplits:
        return self.make_splits(sizes, seed=seed)


def _digits() -> DemoDataset:
    from . import data
    from .model import caption_for

    return DemoDataset("digits", "scikit-learn digits (8x8)", TinyLDMConfig(), data.make_splits, data.public_pool,
                       caption_for, "tiny_ldm_base.safetensors", "digit_classifier.safetensors", "public-v1")


def _textures() -> DemoDataset:
    from . import textures

    cfg = TinyLDMConfig(image_size=textures.IMAGE_SIZE, vocab=textures.VOCAB)
    return DemoDataset("textures", "procedural textured shapes (16x16)", cfg, textures.make_splits,
                       textures.public_pool, textures.caption_for, "tiny_ldm_textures_base.safetensors",
                       "textures_classifier.safetensors", "textures-striped-public-v1", textures.classifier_pool)


_REGISTRY: Dict[str, Callable[[], DemoDataset]] = {"digits": _digits, "textures": _textures}
NAMES = tuple(_REGISTRY)


def get_dataset(name: str) -> DemoDataset:
    """The data set called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown demo data set {name!r}; choose one of {list(NAMES)}.")
    return _REGISTRY[name]()
