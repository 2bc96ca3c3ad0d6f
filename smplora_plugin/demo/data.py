"""scikit-learn's digits, split by identity into a public pool and private member / non-member sets.

Every image is identified by the SHA-256 of its pixels (``digits:<hash>``), so byte-identical
images always land in the same set; the split uses the core's
:func:`smplora_plugin.holdout.split_by_identity` and is recorded as a manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .model import caption_for

#: Names of the private sets, in the order they are drawn.
PRIVATE_SETS = ("member", "nonmember_defense", "nonmember_calibration", "nonmember_eval")


@dataclass
class DigitSet:
    """Images ``(N, 1, H, W)`` in [-1, 1], integer labels, captions and identities.

    ``texts`` holds explicit captions; without it a label's caption is the digits' one.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: List[str]
    texts: Optional[List[str]] = None

    @property
    def captions(self) -> List[str]:
        if self.texts is not None:
            return list(self.texts)
        return [caption_for(int(y)) for y in self.labels]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: Sequence[int]) -> "DigitSet":
        idx = list(idx)
        texts = None if self.texts is None else [self.texts[i] for i in idx]
        return DigitSet(self.images[idx], self.labels[idx], [self.ids[i] for i in idx], texts)

    @staticmethod
    def concat(*sets: "DigitSet") -> "DigitSet":
        """The sets one after the other (captions kept)."""
        texts = None if any(s.texts is None for s in sets) else [t for s in sets for t in s.texts]
        return DigitSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                        [i for s in sets for i in s.ids], texts)


@dataclass
class DigitSplits:
    """The public pool and the private sets; ``sets`` maps a name to its :class:`DigitSet`."""

    public: DigitSet
    sets: Dict[str, DigitSet] = field(default_factory=dict)
    seed: int = 0

    def __getitem__(self, name: str) -> DigitSet:
        return self.sets[name]

    def id_lists(self) -> Dict[str, List[str]]:
        return {"public": list(self.public.ids), **{k: list(v.ids) for k, v in self.sets.items()}}


def load_digits_set() -> DigitSet:
    """All 1797 digits (8x8, grey levels 0..16 mapped to [-1, 1]) with their content identities."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = d.images.astype(np.uint8)
    ids = ["digits:" + hashlib.sha256(x.tobytes()).hexdigest()[:20] for x in raw]
    images = torch.from_numpy(raw.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return DigitSet(images, torch.from_numpy(d.target.astype(np.int64)), ids)


#: Size of the private pool; the remaining digits form the public pool the base model is trained on.
PRIVATE_POOL = 500
#: The public / private partition is fixed (seed 0), so shipped base weights never saw a private digit.
POOL_SEED = 0


def check_split_sizes(sizes: Mapping[str, int], pool: int, noun: str = "images") -> None:
    """``ValueError`` for unknown set names, sizes that are not whole numbers >= 1, or sets larger than ``pool``."""
    unknown = set(sizes) - set(PRIVATE_SETS)
    if unknown:
        raise ConfigError(f"unknown set name(s) {sorted(unknown)}; valid names: {list(PRIVATE_SETS)}.")
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"set {k!r} needs a whole number of images >= 1, got {v!r}.")
    total = sum(sizes.values())
    if total > pool:
        raise ConfigError(f"the private sets ask for {total} {noun} but the private pool holds {pool}; "
                         "reduce --members or the non-member set sizes.")


def make_splits(sizes: Mapping[str, int], *, seed: int = 0) -> DigitSplits:
    """Split the digits by identity into the fixed public pool and private sets of the given ``sizes``.

    The public / private partition is always the same (``POOL_SEED``): the public pool (1297
    digits) trains the base model and the classifier; the private sets (members, and the
    defense's, calibration and evaluation non-members) are drawn from the other
    ``PRIVATE_POOL`` digits with ``seed``. Raises ``ValueError`` for unknown names or sizes
    that do not fit.
    """
    from ..holdout import split_by_identity

    check_split_sizes(sizes, PRIVATE_POOL, "digits")
    allset = load_digits_set()
    by_id: Dict[str, List[int]] = {}
    for i, s in enumerate(allset.ids):
        by_id.setdefault(s, []).append(i)
    pools = split_by_identity(sorted(by_id), {"private": PRIVATE_POOL, "public": len(by_id) - PRIVATE_POOL},
                              seed=POOL_SEED, key="path")
    plan = {k: sizes[k] for k in PRIVATE_SETS if k in sizes}
    parts = split_by_identity(pools["private"], plan, seed=seed, key="path")
    idx = lambda names: sorted(i for s in names for i in by_id[s])  # noqa: E731
    return DigitSplits(public=allset.subset(idx(pools["public"])),
                       sets={k: allset.subset(idx(parts[k])) for k in plan}, seed=seed)


def public_pool() -> DigitSet:
    """The fixed public pool alone (what the base model and the classifier are trained on)."""
    return make_splits({"member": 1}, seed=0).public
