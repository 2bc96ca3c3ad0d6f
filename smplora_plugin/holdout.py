"""Member / non-member splits by identity, JSON manifests, and overlap checks by content hash."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import atomic_write_text
from .errors import HoldoutError

MANIFEST_FORMAT = "smplora-holdout-manifest/1"
Item = Union[str, "os.PathLike[str]", bytes]


def content_hash(item: Item) -> str:
    """SHA-256 hex digest of a file's bytes (or of ``bytes`` given directly)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(item)).hexdigest()
    path = Path(item)
    if not path.is_file():
        raise HoldoutError(f"{path} does not exist or is not a file; cannot hash it.")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise HoldoutError(f"{path} cannot be read ({exc}).") from exc
    return h.hexdigest()


def find_overlap(train: Iterable[Item], holdout: Iterable[Item]) -> List[Tuple[str, str]]:
    """Pairs ``(train_item, holdout_item)`` whose contents are identical."""
    by_hash: Dict[str, str] = {}
    for item in train:
        by_hash.setdefault(content_hash(item), _name(item))
    return [(by_hash[h], _name(item)) for item in holdout if (h := content_hash(item)) in by_hash]


def check_disjoint(train: Iterable[Item], holdout: Iterable[Item], *, train_name: str = "training",
                   holdout_name: str = "holdout") -> None:
    """Raise :class:`HoldoutError` if any holdout item has the same content as a training item."""
    train, holdout = list(train), list(holdout)
    if not holdout:
        raise HoldoutError(f"the {holdout_name} set is empty: non-member data is needed to train the attacker.")
    pairs = find_overlap(train, holdout)
    if pairs:
        shown = "; ".join(f"{a} == {b}" for a, b in pairs[:5])
        more = f" (and {len(pairs) - 5} more)" if len(pairs) > 5 else ""
        raise HoldoutError(
            f"{len(pairs)} {holdout_name} file(s) are byte-identical to {train_name} file(s): {shown}{more}. "
            f"Non-members must never be trained on: remove these files from one of the two sets."
        )


def split_by_identity(items: Sequence[Item], sizes: Mapping[str, Union[int, float]], *, seed: int,
                      key: str = "path") -> Dict[str, List[Any]]:
    """Split ``items`` into named sets by identity, reproducibly for a ``seed``.

    ``key="path"`` identifies items by their string form (path); ``key="content"`` by the
    SHA-256 of their bytes, so byte-identical duplicates always land in the same set.
    ``sizes`` maps set name to a count (int) or a fraction of the identities (float in (0, 1]);
    identities not assigned to any set are dropped. The result does not depend on the order of
    ``items``.
    """
    if key not in ("path", "content"):
        raise HoldoutError(f"key={key!r} is unknown: use 'path' or 'content'.")
    if not sizes:
        raise HoldoutError("sizes is empty: name at least one set, e.g. {'member': 32, 'nonmember': 32}.")
    groups: Dict[str, List[Any]] = defaultdict(list)
    for item in items:
        ident = content_hash(item) if key == "content" else _name(item)
        groups[ident].append(item)
    idents = sorted(groups)
    n = len(idents)
    counts: Dict[str, int] = {}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
            raise HoldoutError(f"size of set {name!r} is {size!r}: use a count (int >= 0) or a fraction in (0, 1].")
        if isinstance(size, float):
            if size > 1:
                raise HoldoutError(f"fraction for set {name!r} is {size}: fractions must be <= 1.")
            counts[name] = int(math.floor(size * n))
        else:
            counts[name] = size
    if sum(counts.values()) > n:
        raise HoldoutError(f"the sets ask for {sum(counts.values())} items ({counts}) but only {n} distinct "
                           "identities exist.")
    order = np.random.default_rng(seed).permutation(n)
    out: Dict[str, List[Any]] = {}
    start = 0
    for name, count in counts.items():
        out[name] = [item for i in order[start:start + count] for item in groups[idents[i]]]
        start += count
    return out


def write_manifest(path: Union[str, "os.PathLike[str]"], splits: Mapping[str, Sequence[Item]], *,
                   seed: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``splits`` (set name -> items) as a JSON manifest, refusing overlapping sets.

    File items are recorded with their SHA-256 so a later run can prove the sets were disjoint.
    """
    sets: Dict[str, List[Dict[str, str]]] = {}
    for name, items in splits.items():
        entries = []
        for item in items:
            entry = {"id": _name(item)}
            if isinstance(item, (bytes, bytearray)) or Path(_name(item)).is_file():
                entry["sha256"] = content_hash(item)
            entries.append(entry)
        sets[name] = entries
    _check_sets_disjoint(sets)
    doc = {"format": MANIFEST_FORMAT, "seed": seed, "sets": sets}
    if extra:
        doc["extra"] = dict(extra)
    path = Path(path)
    text = json.dumps(doc, indent=2, sort_keys=True)
    return atomic_write_text(path, text)


def read_manifest(path: Union[str, "os.PathLike[str]"]) -> Dict[str, List[str]]:
    """Read a manifest written by :func:`write_manifest`: set name -> list of ids (paths)."""
    path = Path(path)
    if not path.is_file():
        raise HoldoutError(f"manifest {path} does not exist.")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HoldoutError(f"manifest {path} is not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("sets"), dict):
        raise HoldoutError(f"{path} is not a smplora holdout manifest (expected format {MANIFEST_FORMAT!r}).")
    sets = {name: [e if isinstance(e, dict) else {"id": str(e)} for e in entries]
            for name, entries in doc["sets"].items()}
    _check_sets_disjoint(sets, source=str(path))
    return {name: [e["id"] for e in entries] for name, entries in sets.items()}


def _check_sets_disjoint(sets: Mapping[str, List[Dict[str, str]]], source: str = "the split") -> None:
    seen: Dict[str, str] = {}
    for name, entries in sets.items():
        for entry in entries:
            for k in ("id", "sha256"):
                if k not in entry:
                    continue
                tag = f"{k}:{entry[k]}"
                other = seen.get(tag)
                if other is not None and other != name:
                    raise HoldoutError(
                        f"{source} puts {entry['id']!r} in both {other!r} and {name!r} (same {k}); members and "
                        "non-members must be disjoint. Rebuild the split with split_by_identity(..., key='content')."
                    )
                seen[tag] = name


def _name(item: Item) -> str:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(bytes(item)).hexdigest()
    return os.fspath(item) if isinstance(item, os.PathLike) else str(item)
