"""The hand-run benchmarks still run end to end at a toy size (no timing is asserted)."""

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    mod = importlib.import_module(f"benchmarks.{name}")
    assert Path(mod.__file__).parent == BENCH, mod.__file__  # not opacus' top-level ``benchmarks`` package
    return mod


def test_step_overhead_runs_every_variant_and_reports():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    mod = _load("step_overhead")
    times, sections, grids, kinds, shares = mod.time_variants("toy", steps=4, warmup=1)
    assert set(times) == set(mod.VARIANTS) and all(len(v) == 4 for v in times.values())
    # toy batch 2 at privacy_fraction 0.25: one row on every other step, a held-out refresh every 4th update
    assert {k: len(v) for k, v in kinds["smp-robust"].items()} == {"privacy + held-out forward": 1,
                                                                   "no privacy row": 2, "privacy": 1}
    assert shares["smp-robust"] == {"privacy + held-out forward": 0.125, "privacy": 0.375, "no privacy row": 0.5}
    assert shares["smp-every"] == {"privacy + held-out forward": 1.0} and shares["plain"] == {"every step": 1.0}
    assert sections["smp-robust"]["base forward (calibration)"] > 0
    assert sections["smp-default"][mod.FIXED_STEP] > 0 and sections["smp-default"][mod.FIXED_FEATURES] > 0
    assert "auxiliary forwards" in sections["reference"] and "non-member forward" in sections["smp-every"]
    assert grids["smp-default"] == (8, 8) and grids["plain"] is None
    mem = {v: {"before_kib": 1000, "peak_kib": 1100} for v in mod.VARIANTS}
    text = mod.report("toy", times, sections, mem, grids, kinds, shares)
    assert "| smp-default |" in text and "time vs plain" in text and "regulariser fixed cost" in text
    assert "n/a" not in text
    sub, _, _, sub_kinds, sub_shares = mod.time_variants("toy", steps=2, warmup=0, variants=("plain", "smp-robust"))
    assert set(sub) == {"plain", "smp-robust"}
    assert mod.amortised(sub_kinds["smp-robust"], sub_shares["smp-robust"]) is None   # 'privacy' never timed
    fixed = mod.fixed_cost([4, 8], steps=2, latent=8)
    assert "| 4 | 64 |" in fixed and "| 8 | 256 |" in fixed
    child = mod.memory_child("toy", "smp-default", steps=1)
    assert child["peak_kib"] >= child["before_kib"] > 0


@pytest.mark.parametrize("config, dataset", [("smp-robust a20", "digits"), ("dp-sgd s1", "digits"),
                                             ("loss-floor", "digits"), ("smp-robust a20 quarter-batch", "textures")])
def test_privacy_utility_trains_and_audits_each_kind(config, dataset):
    pytest.importorskip("opacus") if config.startswith("dp") else None
    pytest.importorskip("sklearn")
    mod = _load("privacy_utility")
    row = mod.run_one(config, seed=0, toy=True, dataset=dataset)
    assert row["config"] == config and row["dataset"] == dataset
    assert 0.0 <= row["max_auc"] <= 1.0 and row["heldout_loss"] > 0
    assert (row["epsilon"] is not None) == config.startswith("dp")
    text = mod.table([row, {**row, "config": "plain", "epsilon": None}])
    assert config in text


def test_frontier_plot_has_a_row_per_dataset(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    mod = _load("privacy_utility")
    rows = [{"dataset": ds, "config": c, "seed": s, "max_auc": 0.5 + 0.1 * s, "max_tpr_1pct": 0.03,
             "classifier_accuracy": 0.9, "heldout_loss": 0.2, "epsilon": None, "frechet_distance": 1.0,
             "max_auc_attack": "loss"}
            for ds in ("digits", "textures") for c in ("plain", "loss-floor") for s in (0, 1)]
    rows.append({**rows[0], "dataset": None})
    del rows[-1]["dataset"]  # rows written before the second data set have no field: digits
    out = tmp_path / "f.png"
    mod.plot(rows, out)
    w, h = Image.open(out).size
    assert h > w * 0.7  # two rows of panels (one per data set), not one
    assert "| loss-floor | 2 |" in mod.table([r for r in rows if mod._dataset(r) == "textures"])
