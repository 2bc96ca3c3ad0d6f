"""Identity splits, manifests and content-hash overlap checks."""

import json

import pytest

from smplora_plugin.errors import HoldoutError
from smplora_plugin.holdout import (
    check_disjoint,
    content_hash,
    find_overlap,
    read_manifest,
    split_by_identity,
    write_manifest,
)


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"img_{i:02d}.png"
        p.write_bytes(f"image-{i}".encode())
        paths.append(p)
    dup = tmp_path / "copy_of_03.png"
    dup.write_bytes(b"image-3")
    return paths, dup


def test_split_is_seeded_disjoint_and_order_independent(images):
    paths, _ = images
    a = split_by_identity(paths, {"member": 8, "nonmember": 8, "audit": 0.2}, seed=1)
    b = split_by_identity(list(reversed(paths)), {"member": 8, "nonmember": 8, "audit": 0.2}, seed=1)
    c = split_by_identity(paths, {"member": 8, "nonmember": 8, "audit": 0.2}, seed=2)
    assert a == b and a != c
    assert [len(a[k]) for k in ("member", "nonmember", "audit")] == [8, 8, 4]
    flat = [str(p) for v in a.values() for p in v]
    assert len(flat) == len(set(flat))


def test_content_key_keeps_duplicates_together(images):
    paths, dup = images
    for seed in range(5):
        s = split_by_identity(paths + [dup], {"m": 10, "n": 10}, seed=seed, key="content")
        where = {str(p): k for k, v in s.items() for p in v}
        assert where[str(paths[3])] == where[str(dup)]


def test_overlap_by_content_is_detected_with_a_clear_error(images):
    paths, dup = images
    assert find_overlap(paths[:5], [dup, paths[10]]) == [(str(paths[3]), str(dup))]
    with pytest.raises(HoldoutError, match="byte-identical.*copy_of_03"):
        check_disjoint(paths[:5], [dup], train_name="training", holdout_name="holdout")
    check_disjoint(paths[:5], paths[5:])
    with pytest.raises(HoldoutError, match="empty"):
        check_disjoint(paths, [])


def test_manifest_round_trip_and_overlap_refusal(images, tmp_path):
    paths, dup = images
    split = split_by_identity(paths, {"member": 10, "nonmember": 10}, seed=0)
    m = write_manifest(tmp_path / "split.json", split, seed=0)
    doc = json.loads(m.read_text())
    assert doc["seed"] == 0 and all("sha256" in e for e in doc["sets"]["member"])
    back = read_manifest(m)
    assert back == {k: [str(p) for p in v] for k, v in split.items()}
    with pytest.raises(HoldoutError, match="both"):
        write_manifest(tmp_path / "bad.json", {"member": [paths[3]], "nonmember": [dup]})
    doc["sets"]["nonmember"].append(doc["sets"]["member"][0])
    (tmp_path / "tampered.json").write_text(json.dumps(doc))
    with pytest.raises(HoldoutError, match="both"):
        read_manifest(tmp_path / "tampered.json")


def test_bad_split_requests(images):
    paths, _ = images
    with pytest.raises(HoldoutError, match="only 20"):
        split_by_identity(paths, {"a": 15, "b": 10}, seed=0)
    with pytest.raises(HoldoutError, match="fraction"):
        split_by_identity(paths, {"a": 1.5}, seed=0)
    with pytest.raises(HoldoutError, match="key"):
        split_by_identity(paths, {"a": 1}, seed=0, key="name")
    assert content_hash(b"abc") == content_hash(b"abc") != content_hash(b"abd")
