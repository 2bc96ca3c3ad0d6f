"""The hand-run benchmarks still run end to end at a toy size (no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_overhead_runs_every_variant_and_reports():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    mod = _load("step_overhead")
    times, sections = mod.time_variants("toy", steps=2, warmup=0)
    assert set(times) == set(mod.VARIANTS) and all(len(v) == 2 for v in times.values())
    assert sections["smp-robust"]["base forward (calibration)"] > 0
    assert "auxiliary forwards" in sections["reference"] and "non-member forward" in sections["smp-every"]
    mem = {v: {"before_kib": 1000, "peak_kib": 1100} for v in mod.VARIANTS}
    text = mod.report("toy", times, sections, mem)
    assert "| smp-default |" in text and "time vs plain" in text
    child = mod.memory_child("toy", "smp-default", steps=1)
    assert child["peak_kib"] >= child["before_kib"] > 0


@pytest.mark.parametrize("config", ["smp-robust a20", "dp-sgd s1", "loss-floor"])
def test_privacy_utility_trains_and_audits_each_kind(config):
    pytest.importorskip("opacus") if config.startswith("dp") else None
    pytest.importorskip("sklearn")
    mod = _load("privacy_utility")
    row = mod.run_one(config, seed=0, toy=True)
    assert row["config"] == config and 0.0 <= row["max_auc"] <= 1.0 and row["heldout_loss"] > 0
    assert (row["epsilon"] is not None) == config.startswith("dp")
    text = mod.table([row, {**row, "config": "plain", "epsilon": None}])
    assert config in text
