"""Smoke run of examples/raw_pytorch_loop.py (few steps): it trains both loops and prints the figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "raw_pytorch_loop.py"


@pytest.mark.slow
def test_raw_pytorch_example_runs_and_reports():
    env = {**os.environ, "SMPLORA_DISABLE_PLUGINS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "30", "--members", "8"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "plain LoRA:" in out and "SMP-LoRA:" in out
    losses = [float(x) for x in re.findall(r"adaptation loss (\d+\.\d+)", out)]
    assert len(losses) >= 4 and all(0 < x < 2 for x in losses)
    aucs = [float(x) for x in re.findall(r"AUC (\d+\.\d+)", out)]
    assert len(aucs) == 4 and all(0 <= a <= 1 for a in aucs)
    proxy = re.search(r"proxy attacker: .*attacker_acc=(\d+\.\d+)", out)
    assert proxy and 0 <= float(proxy.group(1)) <= 1
    assert "step   29" in out
