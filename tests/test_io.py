"""smplora_plugin._io: the one copy of the atomic write, the report number formats and the JSON fallback."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from smplora_plugin._io import atomic_write, atomic_write_text, fmt, json_default, pct


def test_atomic_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    assert atomic_write_text(path, "héllo\n") == path
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    atomic_write_text(path, "second")
    assert path.read_text(encoding="utf-8") == "second" and os.listdir(path.parent) == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("x, nd, want", [(None, 3, "n/a"), (0.12345, 3, "0.123"), (1.25, 1, "1.2"), (2, 2, "2.00")])
def test_fmt(x, nd, want):
    assert fmt(x, nd) == want


@pytest.mark.parametrize("x, want", [(None, "n/a"), (0.0123, "1.2%"), (1.0, "100.0%"), (-0.0001, "0.0%")])
def test_pct_never_shows_minus_zero(x, want):
    assert pct(x) == want


def test_json_default_turns_arrays_and_tensors_into_lists_and_the_rest_into_strings(tmp_path):
    doc = {"f": np.float32(0.5), "i": np.int64(3), "a": np.arange(3), "t": torch.tensor([1.0, 2.0]), "p": tmp_path}
    assert json.loads(json.dumps(doc, default=json_default)) == {"f": 0.5, "i": 3, "a": [0, 1, 2], "t": [1.0, 2.0],
                                                                  "p": str(tmp_path)}
