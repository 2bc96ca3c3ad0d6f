"""The demo's data sets: each names its model shape, splits, public pool, captions and weight files.

- ``digits``: scikit-learn's 8x8 handwritten digits (:mod:`.data`), the default.
- ``textures``: 16x16 textured shapes generated in code (:mod:`.textures`), harder: every
  image carries instance detail its caption does not describe, and the base model has never
  seen half of the classes (dotted shapes), so the LoRA has something to learn.
- ``emoji``: 16x16 RGB emoji (:mod:`.emoji`); the base draws them in Noto's style, the LoRA learns
  Twemoji's from its members: a style LoRA, the paper's Pokemon setting scaled down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..errors import ConfigError
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
    #: the classifier's number of classes
    classes: int = 10
    #: ``(model, clf, member_captions, reference, *, n, steps, guidance, seed) -> dict``: a data set's own
    #: sample quality (emoji: style shares); ``None``: classifier accuracy per label (digits, textures)
    utility: Optional[Callable[..., Dict[str, Any]]] = None
    #: real images a perfect generator would match (the Fréchet floor); ``None``: the classifier pool
    real_pool: Optional[Callable[[], DigitSet]] = None
    #: ``(data, *, epochs, seed, progress) -> classifier`` and ``() -> untrained classifier``;
    #: ``None``: the demo's :class:`~smplora_plugin.demo.quality.DigitClassifier`
    fit_classifier: Optional[Callable[..., Any]] = None
    new_classifier: Optional[Callable[[], Any]] = None
    #: the classifier's epochs when they differ from ``DemoConfig.classifier_epochs``
    classifier_epochs: Optional[int] = None

    def make_classifier(self) -> Any:
        """An untrained utility classifier of the shipped shape (to load weights into)."""
        from .quality import DigitClassifier

        if self.new_classifier is not None:
            return self.new_classifier()
        return DigitClassifier(image_size=self.model_config.image_size, classes=self.classes,
                               in_channels=self.model_config.image_channels)

    def train_classifier(self, default_epochs: int, *, progress: bool = True) -> Any:
        """Train the utility classifier on :meth:`classifier_data` (seed 0)."""
        from .quality import train_classifier

        fit = self.fit_classifier or train_classifier
        return fit(self.classifier_data(), epochs=self.classifier_epochs or default_epochs, seed=0, progress=progress)

    def classifier_data(self) -> DigitSet:
        return (self.classifier_pool or self.public_pool)()

    def real_data(self) -> DigitSet:
        return (self.real_pool or self.classifier_data)()

    def sample_quality(self, model: Any, clf: Any, members: DigitSet, reference: DigitSet, *, per_label: int,
                       steps: int, guidance: float, seed: int) -> Dict[str, Any]:
        """Sample quality of ``model``: per label (``per_label`` samples of each class), or the data
        set's own ``utility`` (``5 * per_label`` samples at the members' captions and as many at
        ``reference``'s, never trained on)."""
        from .quality import sample_quality

        if self.utility is None:
            return sample_quality(model, clf, reference, per_label=per_label, steps=steps, guidance=guidance,
                                  seed=seed, captioner=self.captioner)
        return self.utility(model, clf, members.captions, reference, n=5 * per_label, steps=steps,
                            guidance=guidance, seed=seed)

    def grid_captions(self, members: DigitSet, reference: DigitSet) -> List[str]:
        """The 40 captions of ``samples.png`` (4 rows of 10): the 10 classes, or 5 members' and 5 unseen captions."""
        if self.utility is None:
            return [self.captioner(i) for i in range(10)] * 4
        row = [members.captions[i % len(members)] for i in range(5)] + [reference.captions[i] for i in range(5)]
        return row * 4

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


def _emoji() -> DemoDataset:
    from . import emoji

    cfg = TinyLDMConfig(image_size=emoji.IMAGE_SIZE, latent_channels=12, image_channels=3, max_words=emoji.MAX_WORDS,
                        vocab=emoji.vocab())
    return DemoDataset("emoji", "emoji, Noto base / Twemoji LoRA (16x16 RGB)", cfg, emoji.make_splits,
                       emoji.public_pool, emoji.caption_for, "tiny_ldm_emoji_base.safetensors",
                       "emoji_style_classifier.safetensors", "emoji-google-candidates-v1", emoji.classifier_pool,
                       classes=2, utility=emoji.style_utility,
                       real_pool=lambda: emoji.load_emoji("classifier_twitter"),
                       fit_classifier=emoji.train_style_classifier, new_classifier=emoji.StyleClassifier,
                       classifier_epochs=emoji.STYLE_CLASSIFIER_EPOCHS)


_REGISTRY: Dict[str, Callable[[], DemoDataset]] = {"digits": _digits, "textures": _textures, "emoji": _emoji}
NAMES = tuple(_REGISTRY)


def get_dataset(name: str) -> DemoDataset:
    """The data set called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown demo data set {name!r}; choose one of {list(NAMES)}.")
    return _REGISTRY[name]()
