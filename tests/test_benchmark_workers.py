"""benchmarks/_common.py: the shared worker processes, formats, atomic writes and the command line."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import _common as common

REPO = Path(__file__).resolve().parents[1]


def test_workers_are_fresh_niced_processes():
    [(task, niceness, error)] = common.run_in_workers(os.nice, [(0,)], jobs=2, nice=3)
    assert task == (0,) and error is None and niceness == os.nice(0) + 3  # os.nice(0): the worker's niceness
    pids = [pid for _, pid, _ in common.run_in_workers(os.getpid, [(), ()], jobs=1)]
    assert len(set(pids)) == 2 and os.getpid() not in pids  # a fresh process per task


def test_worker_errors_come_back_and_the_rest_still_run():
    got = sorted(common.run_in_workers(math.sqrt, [(4.0,), (-1.0,)], jobs=2), key=lambda r: r[0])
    assert [(task, result) for task, result, _ in got] == [((-1.0,), None), ((4.0,), 2.0)]
    error = got[0][2]
    assert isinstance(error, ValueError) and "math domain error" in str(error.__cause__)  # the worker's traceback
    assert got[1][2] is None


def test_nothing_starts_without_tasks_or_after_the_deadline():
    assert list(common.run_in_workers(os.getpid, [], jobs=2)) == []
    assert list(common.run_in_workers(os.getpid, [()], jobs=2, deadline=time.time() - 1)) == []
    with pytest.raises(ValueError, match="jobs"):
        list(common.run_in_workers(os.getpid, [()], jobs=0))


def test_formats_and_atomic_text(tmp_path):
    assert common.fmt(None) == "n/a" and common.fmt(0.12345) == "0.123" and common.fmt(2.0, 1) == "2.0"
    assert common.pct(None) == "n/a" and common.pct(0.1234) == "12.3%" and common.pct(-1e-9) == "0.0%"
    assert common.json_default(__import__("numpy").arange(2)) == [0, 1]
    assert common.json_default(tmp_path) == str(tmp_path)
    path = tmp_path / "RESULTS.md"
    common.write_section("s", "one", path)
    common.write_section("s", "two", path)
    text = path.read_text()
    assert "<!-- s:start -->\ntwo\n<!-- s:end -->" in text and "one" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary file left behind


def test_command_names_the_module_it_runs_as(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "frontier.py"), "run", "--rows", "a b"])
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="benchmarks.frontier")))
    assert common.command() == "python -m benchmarks.frontier run --rows 'a b'"
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=None))  # run as a script
    monkeypatch.chdir(REPO)
    assert common.command() == "python benchmarks/frontier.py run --rows 'a b'"
