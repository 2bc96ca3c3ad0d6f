"""benchmarks/verdict_calibration.py still runs end to end at a toy size (no timing is asserted)."""

from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    from benchmarks import verdict_calibration

    assert Path(verdict_calibration.__file__).parent == BENCH, verdict_calibration.__file__
    return verdict_calibration


def test_verdict_calibration_null_and_demo_rows_and_summary():
    mod = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        null = [mod.null_run(s, n_eval=8, n_cal=6, side=4, toy=True) for s in (0, 1)]
        demo = mod.demo_run(0, members=8, steps=2, n_cal=8, n_eval=8, toy=True)
        frac = mod.demo_run(0, members=8, steps=2, n_cal=8, n_eval=8, toy=True, variants=("robust f=0.25 over steps",),
                            batch_size=1, mode="fraction")
    finally:
        torch.set_num_threads(threads)
    assert {r["verdict"] for r in null} <= {"leaks", "no evidence of leakage at this size", "too few samples to tell"}
    assert [r["variant"] for r in demo] == ["untouched", "plain"] and demo[0]["n_member_eval"] == 4
    text = mod.summarise(null, "null")
    assert "false-alarm rate ('leaks'): " in text and "2 seeds" in text
    assert "| untouched | 1 |" in mod.summarise(demo, "demo")
    assert frac[0]["batch_size"] == 1 and frac[0]["mode"] == "fraction"
    assert "| robust f=0.25 over steps | 1 |" in mod.summarise(frac, "fraction")
    assert mod._seeds("0-2,5") == [0, 1, 2, 5]
