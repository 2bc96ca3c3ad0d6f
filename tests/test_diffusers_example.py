"""End to end: examples/diffusers/train_text_to_image_lora.py with --privacy smplora on the tiny pipeline.

Runs the script (subprocess, offline) with gradient accumulation and checkpoints, resumes a second run
from the first run's mid-way checkpoint, and checks exact continuation, the smplora.* metadata, the
logs, that the LoRA loads into a pipeline that generates an image, that an overlapping holdout
stops the run before training, and a two-process run with --privacy_preset robust (calibrated features).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "diffusers" / "train_text_to_image_lora.py"
STEPS = 4


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", REPO / "examples" / "diffusers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SMPLORA_DISABLE_PLUGINS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(root, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(root / "pipeline"),
           "--train_data_dir", str(root / "train"), "--resolution", "32", "--center_crop",
           "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_train_steps", str(STEPS),
           "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
           "--rank", "4", "--privacy", "smplora", "--privacy_holdout_dir", str(root / "holdout"),
           "--privacy_alpha", "0.5", "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32", "16",
           "--privacy_attacker_lr", "1e-3", "--output_dir", str(out), *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _metrics_line(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("smplora {")]
    assert len(lines) == 1, stdout[-2000:]
    return json.loads(lines[0][len("smplora "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    make = _load_example("make_tiny_pipeline")
    assert make.main(["--out", str(root), "--digits", "16", "--holdout", "16"]) == 0
    a = _train(root, root / "outA", "--validation_prompt", "a handwritten digit 3", "--num_inference_steps", "2")
    assert a.returncode == 0, a.stderr[-4000:]
    (root / "outB").mkdir()
    shutil.copytree(root / "outA" / "checkpoint-2", root / "outB" / "checkpoint-2")
    b = _train(root, root / "outB", "--resume_from_checkpoint", "latest")
    assert b.returncode == 0, b.stderr[-4000:]
    return root, a, b


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resumed_run_continues_exactly(runs):
    root, a, b = runs
    assert "Resuming from checkpoint checkpoint-2" in b.stdout + b.stderr
    for rel in ("pytorch_lora_weights.safetensors", "smplora_state.safetensors",
                "checkpoint-4/smplora_state.safetensors", "checkpoint-4/pytorch_lora_weights.safetensors"):
        ta, tb = _load(root / "outA" / rel), _load(root / "outB" / rel)
        assert set(ta) == set(tb) and ta, rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}:{k} differs after resume"
    ma, mb = _metrics_line(a.stdout), _metrics_line(b.stdout)
    assert ma == mb
    # accumulation 2: the attacker updated once per optimiser step, the loss was regularised every micro-step
    assert ma["attacker_updates"] == STEPS and ma["step"] == 2 * STEPS
    assert 0.0 <= ma["attacker_acc"] <= 1.0 and ma["attacker_ce_member"] > 0 and ma["denominator"] > 1.0
    # the LoRA trained (B matrices start at zero... gaussian init: A random, B zero)
    lora = _load(root / "outA" / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora.up" in k or "lora_B" in k) > 0
    # checkpoints hold our safetensors state and no pickled custom state
    ckpt = sorted(p.name for p in (root / "outA" / "checkpoint-2").iterdir())
    assert "smplora_state.safetensors" in ckpt and not any(n.startswith("custom_checkpoint") for n in ckpt)


def test_metrics_logged_as_floats(runs):
    root, _, b = runs
    rows = [json.loads(ln) for ln in (root / "outA" / "logs" / "logs.jsonl").read_text().splitlines()]
    priv = [r for r in rows if "smplora/attacker_ce_member" in r]
    assert [r["step"] for r in priv] == list(range(1, STEPS + 1))
    assert all(isinstance(v, float) for r in priv for k, v in r.items() if k != "step")
    assert [r["smplora/attacker_updates"] for r in priv] == [1.0, 2.0, 3.0, 4.0]
    resumed = [json.loads(ln) for ln in (root / "outB" / "logs" / "logs.jsonl").read_text().splitlines()]
    assert [r for r in resumed if "smplora/step" in r] == priv[2:]      # steps 3 and 4 identical
    assert "mia_ce=" in b.stderr and "mia_acc=" in b.stderr               # progress bar postfix


def test_lora_file_is_annotated_and_loads_into_a_pipeline(runs):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from smplora_plugin import read_privacy_metadata

    root, a, _ = runs
    lora_path = root / "outA" / "pytorch_lora_weights.safetensors"
    meta = read_privacy_metadata(lora_path)
    assert meta["smplora.method"] == "smp-lora"
    cfg = json.loads(meta["smplora.config"])
    assert cfg["alpha"] == 0.5 and cfg["hidden"] == [32, 16] and cfg["seed"] == 0
    assert json.loads(meta["smplora.metrics"])["attacker_updates"] == STEPS
    with safe_open(str(lora_path), "pt") as f:
        header = f.metadata()
    assert header.get("format") == "pt"                       # diffusers' own key kept
    assert (root / "outA" / "validation_0.png").is_file()     # the script's own validation after load_lora_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(root / "pipeline"), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
        base = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **kw).images
        pipe.load_lora_weights(str(root / "outA"))
        tuned = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        torch.set_num_threads(threads)
    assert tuned.shape == (1, 3, 32, 32) and torch.isfinite(tuned).all()
    assert not torch.equal(base, tuned)                       # the adapter is active


def test_overlapping_holdout_stops_before_training(runs, tmp_path):
    root, _, _ = runs
    bad = tmp_path / "holdout"
    shutil.copytree(root / "holdout", bad)
    shutil.copy(sorted((root / "train").glob("*.png"))[0], bad / "leaked.png")
    out = tmp_path / "out"
    proc = _train(root, out, "--privacy_holdout_dir", str(bad))
    assert proc.returncode != 0
    assert "HoldoutError" in proc.stderr and "byte-identical" in proc.stderr and "leaked.png" in proc.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "pytorch_lora_weights.safetensors").exists()


def test_script_runs_with_two_cpu_processes(runs, tmp_path):
    """Two processes (DDP-wrapped UNet) with --privacy_preset robust: base predictions through the wrapper."""
    from safetensors import safe_open

    root, _, _ = runs
    out = tmp_path / "out2"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # torchrun + ACCELERATE_USE_CPU: accelerate's own launcher needs mpirun for several CPU processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(SCRIPT),
           "--pretrained_model_name_or_path", str(root / "pipeline"), "--train_data_dir", str(root / "train"),
           "--resolution", "32", "--center_crop", "--train_batch_size", "2", "--max_train_steps", "2",
           "--checkpointing_steps", "2", "--lr_warmup_steps", "0", "--seed", "0", "--privacy", "smplora",
           "--privacy_holdout_dir", str(root / "holdout"), "--privacy_feature_grid", "8",
           "--privacy_attacker_hidden", "32", "16", "--privacy_preset", "robust", "--privacy_nonmember_every", "1",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=dict(_env(), ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MULTI_CPU" in proc.stderr and "[RANK 1]" in proc.stderr
    # robust: privacy_fraction 0.25 over steps at batch 2: step 0 has one privacy row, step 1 none (no base or
    # held-out forward on either process, no collective), so one attacker update
    assert _metrics_line(proc.stdout)["attacker_updates"] == 1
    with safe_open(str(out / "checkpoint-2" / "smplora_state.safetensors"), "pt") as f:
        cursor = json.loads(f.metadata()["shim.diffusers.holdout"])
        counters = json.loads(f.metadata()["meta.counters"])
    # the held-out batch is ceil(0.25 * 2) = 1 image per process
    assert cursor["num_processes"] == 2 and cursor["batch_size"] == 1
    assert cursor["draws"] == 1 and cursor["position"] == 2 * 1 * 1 and counters["global_step"] == 2
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["smplora.config"])
    # calibrated=True makes reg.features refuse a missing base prediction, so this run used one every step
    assert (config["calibrated"], config["alpha"], config["attacker_lr"], config["privacy_fraction"]) == (
        True, 20.0, 1e-3, 0.25)
