"""Shared by the whole-trainer benchmarks: run a training script unchanged in a child process that
time-stamps every step of its training optimiser, and time the process from outside.

The child registers a global ``torch.optim`` step post-hook that records ``time.perf_counter()``
after every step of an ``AdamW`` (the trainers' optimiser here; the SMP-LoRA attacker's ``Adam``
is not counted), then runs the script (a path) or a module (``module:NAME``) as ``__main__``. A
step's time is the gap between two consecutive stamps: forward, privacy term, backward, optimiser.
``perf_counter`` is the system-wide monotonic clock on Linux, so the parent can place the stamps
against the process's start and end.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

CHILD = """
import json, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = []
register_optimizer_step_post_hook(
    lambda opt, args, kwargs: stamps.append(time.perf_counter()) if type(opt) is torch.optim.AdamW else None)
target = sys.argv[1]
try:
    if target.startswith("module:"):
        sys.argv = [target[len("module:"):]] + sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(target, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
print("STEP_STAMPS " + json.dumps(stamps))
"""


@dataclass
class StampedRun:
    """One stamped run: its step stamps and the process's own accounting."""

    stamps: List[float]
    started: float  # perf_counter just before the process started
    ended: float  # perf_counter just after it was reaped
    cpu_s: float  # user + system CPU seconds of the process
    peak_mib: float  # peak resident memory (ru_maxrss)

    def mean_step(self, skip: int) -> float:
        """Mean gap between consecutive stamps, the first ``skip`` gaps dropped (warm-up)."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][skip:]
        return statistics.fmean(gaps)

    @property
    def before_first_step(self) -> float:
        return self.stamps[0] - self.started

    @property
    def after_last_step(self) -> float:
        return self.ended - self.stamps[-1]

    @property
    def wall(self) -> float:
        return self.ended - self.started


def run_stamped(python: str, target: str, args: Sequence[str], env: Mapping[str, str], steps: int,
                cwd: Optional[str] = None, what: str = "run") -> StampedRun:
    """Run ``target`` (a script path or ``module:NAME``) with ``args`` under ``python``; check that it
    made exactly ``steps`` optimiser steps."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([python, "-c", CHILD, target, *args], env=dict(env), cwd=cwd, stdout=out,
                                stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time and peak RSS
        ended = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    line = next((ln for ln in stdout.splitlines() if ln.startswith("STEP_STAMPS ")), None)
    if line is None:
        raise RuntimeError(f"{what}: the child printed no step stamps:\n{stderr[-3000:]}")
    stamps = json.loads(line[len("STEP_STAMPS "):])
    if len(stamps) != steps:
        raise RuntimeError(f"{what}: expected {steps} optimiser steps, stamped {len(stamps)}")
    return StampedRun(stamps, started, ended, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def offline_env(**extra: str) -> dict:
    """This process's environment with one thread and no network, and no distributed variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
