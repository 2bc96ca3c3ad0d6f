"""benchmarks/dp_cost.py (DP-SGD step cost at SD1.5 size) runs end to end at a tiny size and writes its rows;
its ratios come from the timed steps. No timing is asserted."""

import importlib
import json
from pathlib import Path

import pytest

from _helpers import one_thread  # noqa: F401  (autouse: one torch thread)

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("opacus")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    mod = importlib.import_module("benchmarks.dp_cost")
    assert Path(mod.__file__).parent == BENCH, mod.__file__  # not opacus' top-level ``benchmarks`` package
    return mod


def test_quick_run_writes_rows_and_the_section(tmp_path):
    mod = _load()
    rows_path, md = tmp_path / "rows.jsonl", tmp_path / "RESULTS.md"
    assert mod.main(["--quick", "--batches", "2", "--precisions", "bf16", "--repeats", "2", "--warmup", "0",
                     "--out", str(rows_path), "--write", "--results-file", str(md)]) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [(r["precision"], r["batch"], r["variant"]) for r in rows] == [("bf16", 2, "plain"), ("bf16", 2, "dp")]
    # the LoRA counted independently: rank 4 x (in + out) of every lora_A / lora_B pair
    unet = mod.build_unet(mod.unet_config(True, 8))
    want = sum(m.weight.numel() for n, m in unet.named_modules() if n.endswith(("lora_A.default", "lora_B.default")))
    for r in rows:
        assert r["quick"] and r["latent"] == 8 and r["lora_params"] == want
        assert len(r["step_s"]) == 2 and all(s > 0 for s in r["step_s"])
        assert r["min_s"] == min(r["step_s"]) and r["median_s"] >= r["min_s"]
        assert len(r["cpu_s"]) == 2 and all(c > 0 for c in r["cpu_s"])
        assert r["peak_kib"] >= r["before_kib"] > 0          # from the child process of that variant alone
        assert r["per_sample_grad_bytes"] == (2 * want * 4 if r["variant"] == "dp" else 0)
    text = md.read_text()
    assert "<!-- dp_cost:start -->" in text and "## DP-SGD step cost at SD1.5 scale" in text
    assert "| bf16 | 2 |" in text and "peak RSS plain / DP" in text


def test_table_ratios_come_from_the_timed_steps():
    mod = _load()
    times = {("fp32", 1, "plain"): [1.0, 2.0, 4.0], ("fp32", 1, "dp"): [3.0, 2.0, 6.0]}
    cpu = {("fp32", 1, "plain"): [1.0, 1.0, 2.0], ("fp32", 1, "dp"): [1.5, 1.2, 3.0]}
    rows = mod.rows(times, None, lora_params=10, meta={}, cpu=cpu)
    line = next(ln for ln in mod.table(rows).splitlines() if ln.startswith("| fp32 | 1 |"))
    # min 2/1, median 3/2, per round 3, 1, 1.5 -> median 1.5; CPU min 1.2/1, median 1.5/1; buffer 1 x 10 x 4 bytes
    assert "| 2.000x | 1.500x | 1.500x (1.000-3.000) | 1.00 / 1.50 | 1.200x / 1.500x | 0.0 |" in line
    assert "peak RSS" not in mod.table(rows)
    assert "CPU" not in mod.table(mod.rows(times, None, lora_params=10, meta={}))


def test_dp_step_really_runs_through_dptraining():
    mod = _load()
    bench = mod.Bench(True, 8, [2])
    dpt, _ = bench.dp[2]
    assert bench.step("dp", 2, "fp32") > 0 and dpt.dp.steps == 1 and dpt.last_norms.numel() == 2
    assert not dpt.hooks.attached                      # detached again: the plain step carries no hooks
    before = [p.detach().clone() for p in bench.unet.parameters() if p.requires_grad]
    bench.step("plain", 2, "bf16")
    after = [p for p in bench.unet.parameters() if p.requires_grad]
    assert dpt.dp.steps == 1 and any(not (a == b).all() for a, b in zip(after, before))
    with pytest.raises(ValueError, match="variant"):
        bench.step("smp", 2, "fp32")


def test_bad_precision_is_refused():
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--quick", "--precisions", "fp16"])
