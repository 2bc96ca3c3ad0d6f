"""The step stamping that the whole-trainer benchmarks (script_overhead.py, kohya_overhead.py) rely on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks._stamps import offline_env, run_stamped

TRAINER = """
import sys, torch
n = int(sys.argv[1])
w = torch.nn.Parameter(torch.zeros(3))
opt, other = torch.optim.AdamW([w], lr=0.1), torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
for _ in range(n):
    w.sum().backward(); opt.step(); other.step()
if len(sys.argv) > 2:
    raise SystemExit(int(sys.argv[2]))
"""


@pytest.fixture()
def trainer(tmp_path: Path) -> Path:
    (tmp_path / "toy_trainer.py").write_text(TRAINER)
    return tmp_path / "toy_trainer.py"


def test_stamps_every_adamw_step_of_a_script_and_only_those(trainer: Path):
    run = run_stamped(sys.executable, str(trainer), ["3"], offline_env(), steps=3)
    assert len(run.stamps) == 3 and run.stamps == sorted(run.stamps)  # the Adam's 3 steps are not stamped
    assert run.started < run.stamps[0] and run.stamps[-1] < run.ended
    assert run.mean_step(skip=0) == pytest.approx((run.stamps[2] - run.stamps[0]) / 2)
    assert run.mean_step(skip=1) == pytest.approx(run.stamps[2] - run.stamps[1])
    assert run.cpu_s > 0 and run.peak_mib > 10


def test_runs_a_module_as_main_with_its_arguments(trainer: Path):
    env = offline_env(PYTHONPATH=str(trainer.parent))
    assert len(run_stamped(sys.executable, "module:toy_trainer", ["2", "0"], env, steps=2).stamps) == 2


def test_a_wrong_step_count_or_a_failing_trainer_is_an_error(trainer: Path):
    with pytest.raises(RuntimeError, match="expected 4 optimiser steps, stamped 2"):
        run_stamped(sys.executable, str(trainer), ["2"], offline_env(), steps=4)
    with pytest.raises(RuntimeError, match=r"toy failed \(exit 3\)"):
        run_stamped(sys.executable, str(trainer), ["1", "3"], offline_env(), steps=1, what="toy")
