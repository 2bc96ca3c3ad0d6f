"""`run_demo(jobs=2)`: the columns in two worker processes give the figures of one after another."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _tiny():
    from smplora_plugin.demo.pipeline import DemoConfig

    return DemoConfig.quick(members=8, steps=4, nonmember_defense=8, nonmember_calibration=8, nonmember_eval=8,
                            samples_per_label=1, sample_steps=2, attacks=("loss", "loss_calibrated", "sima", "logreg"),
                            audit={"draws": 1, "n_boot": 50, "timesteps": [100, 300]})


def _figures(out):
    """summary.json and every report.json, with timings and this run's folder left out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "jobs")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    files = ["summary.json"] + [f"{c}/report.json" for c in ("plain", "smp", "smp-robust", "base")]
    return {f: strip(json.loads((out / f).read_text().replace(str(out), "<out>"))) for f in files}


@pytest.mark.slow
def test_two_jobs_give_the_figures_of_one(tmp_path):
    import torch

    from smplora_plugin.demo.columns import SLOWEST_FIRST, columns_of, default_jobs
    from smplora_plugin.demo.pipeline import run_demo

    cfg = _tiny()
    assert columns_of(cfg) == ["plain", "smp", "smp-robust", "base"] and SLOWEST_FIRST[0] == "smp-robust"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_demo(cfg, tmp_path / "one", progress=False, log=lambda m: None)
        lines = []
        two = run_demo(cfg, tmp_path / "two", progress=False, log=lines.append, jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert one["jobs"] == 1 and two["jobs"] == 2
    assert lines[0].startswith("Training and auditing the 4 columns in 2 worker processes (1 torch thread each)")
    assert sorted(ln.split(":")[0] for ln in lines[1:]) == sorted(["plain LoRA", "SMP-LoRA", "SMP-LoRA robust",
                                                                   "base model (no LoRA)"])
    assert _figures(tmp_path / "one") == _figures(tmp_path / "two")
    from safetensors import safe_open

    for c in ("plain", "smp", "smp-robust"):  # the workers wrote each LoRA (the same tensors and header) and samples
        files = [safe_open(str(tmp_path / run / c / "lora.safetensors"), framework="pt") for run in ("one", "two")]
        assert files[0].metadata() == files[1].metadata() and set(files[0].keys()) == set(files[1].keys())
        assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())
        assert (tmp_path / "two" / c / "samples.png").is_file()
    assert two["variants"]["plain"]["heldout_loss_ratio_to_plain"] == pytest.approx(1.0)
    assert 1 <= default_jobs(4) <= 4 and default_jobs(4, threads=10_000) == 1


def test_bad_jobs_are_refused_before_any_file(tmp_path):
    from smplora_plugin.cli import main
    from smplora_plugin.demo.pipeline import run_demo

    with pytest.raises(ValueError, match="jobs"):
        run_demo(_tiny(), tmp_path / "x", jobs=0)
    assert main(["demo", "--jobs", "0", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
