"""Shared by the benchmarks: number formatting, JSON, atomic writes, worker processes, the machine
description and writing a section of RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import os
import platform
import re
import shlex
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from smplora_plugin._io import atomic_write, atomic_write_text, fmt, json_default, pct
from smplora_plugin.errors import ConfigError

RESULTS = Path(__file__).with_name("RESULTS.md")

__all__ = ["RESULTS", "atomic_write", "atomic_write_text", "command", "fmt", "header", "json_default", "machine",
           "pct", "run_in_workers", "write_section"]
# fmt, pct, json_default, atomic_write(_text): smplora_plugin._io's, re-exported for the benchmarks


# ---------------------------------------------------------------------------------------------
# worker processes


def _worker_init(nice: int) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if nice:
        os.nice(nice)
    torch.set_num_threads(1)


def run_in_workers(fn: Callable[..., Any], tasks: Iterable[Sequence[Any]], *, jobs: int, nice: int = 0,
                   deadline: Optional[float] = None) -> Iterator[Tuple[Sequence[Any], Any, Optional[Exception]]]:
    """``fn(*task)`` for every task in spawned worker processes: a fresh process per task, niced by ``nice``,
    one torch thread, at most ``jobs`` at a time, none started after ``deadline`` (``time.time()``).

    Yields ``(task, result, None)`` or ``(task, None, error)`` as each task finishes; a worker's error
    carries its traceback as ``__cause__``. ``fn`` must be importable (a module-level function). No
    process is started when there are no tasks.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}: use a whole number >= 1 (worker processes).")
    todo = deque(tasks)
    if not todo:
        return
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(nice,), **fresh) as pool:
        running: dict = {}
        while todo or running:
            while todo and len(running) < jobs and (deadline is None or time.time() < deadline):
                task = todo.popleft()
                running[pool.submit(fn, *task)] = task
            if deadline is not None and time.time() >= deadline:
                todo.clear()
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                try:
                    result, error = fut.result(), None
                except Exception as exc:  # the worker's error: the caller counts it and goes on
                    result, error = None, exc
                yield task, result, error


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def command() -> str:
    """The command line of this process: ``python -m benchmarks.NAME ...`` when run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else [os.path.relpath(sys.argv[0])]
    return "python " + " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def header() -> str:
    return (f"- command: `{command()}`\n- machine: {machine()}\n"
            f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n")


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section delimited by ``<!-- name:start -->`` / ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS``, ``VmHWM``: Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
