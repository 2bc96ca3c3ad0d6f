"""smplora-kohya with the real ``sdxl_train_network.py`` on a full-size random SDXL (opt-in, slow, offline, CPU).

Skipped unless SD_SCRIPTS_DIR points to an sd-scripts checkout (v0.10.0 or newer) and SMPLORA_SDXL_FIXTURE to a
folder made by ``scripts/kohya/make_random_sdxl.py`` (a 7 GB bf16 checkpoint: building it needs about 14 GB of
RAM, so the test never builds it itself). Each run loads the 3.5B-parameter model (about 11 GB of RAM with
``--full_bf16``) and trains 2 steps at 64 px; the whole file takes 10-20 minutes on 2 CPU cores.

    python scripts/kohya/make_random_sdxl.py /data/sdxl-fixture --sd_scripts ~/sd-scripts
    SD_SCRIPTS_DIR=~/sd-scripts SD_SCRIPTS_PYTHON=~/sd-scripts/venv/bin/python \\
        SMPLORA_SDXL_FIXTURE=/data/sdxl-fixture python -m pytest -m sdscripts tests/test_kohya_sdxl_real.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sdscripts, pytest.mark.slow,
              pytest.mark.skipif(not (os.environ.get("SD_SCRIPTS_DIR") and os.environ.get("SMPLORA_SDXL_FIXTURE")),
                                 reason="needs SD_SCRIPTS_DIR and SMPLORA_SDXL_FIXTURE (made by make_random_sdxl.py)")]

PY = os.environ.get("SD_SCRIPTS_PYTHON", sys.executable)
CHECKPOINT = "sdxl_random_bf16.safetensors"
VOLATILE = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "sshs_model_hash",
            "sshs_legacy_hash", "modelspec.date", "ss_sd_scripts_commit_hash"}
SMALL = ["--privacy_alpha", "0.5", "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32,16"]


@pytest.fixture(scope="module")
def fx() -> Path:
    path = Path(os.environ["SMPLORA_SDXL_FIXTURE"])
    if not (path / CHECKPOINT).is_file():
        pytest.fail(f"{path} holds no {CHECKPOINT}: make it with scripts/kohya/make_random_sdxl.py")
    return path


def dataset_toml(fx: Path, path: Path) -> Path:
    path.write_text(
        "[general]\ncaption_extension = '.caption'\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{fx}/train/5_tiny'\n"
        "num_repeats = 5\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\nvalidation_split = 1.0\n"
        f"[[datasets.subsets]]\nimage_dir = '{fx}/holdout/1_tiny'\nnum_repeats = 1\n")
    return path


def run_sdxl(fx: Path, out: Path, ds: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "400"}  # rich: no wrapping
    cmd = [PY, "-m", "smplora_plugin.integrations.kohya", "--sd_scripts", os.environ["SD_SCRIPTS_DIR"],
           "sdxl_train_network.py", "--pretrained_model_name_or_path", str(fx / CHECKPOINT),
           "--tokenizer_cache_dir", str(fx / "tokenizers"), "--dataset_config", str(ds), "--output_dir", str(out),
           "--output_name", "sdxl", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
           "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--optimizer_type", "AdamW",
           "--learning_rate", "1e-4", "--mixed_precision", "bf16", "--full_bf16", "--max_data_loader_n_workers", "0",
           "--validate_every_n_epochs", "1000", "--seed", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=str(out.parent))


def header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def finite(metrics: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())


def test_real_sdxl_paper_and_robust_save_resume_and_header(fx, tmp_path):
    ds = dataset_toml(fx, tmp_path / "dataset.toml")
    # 1. paper preset, bf16, checkpoints every step and --save_state
    a = run_sdxl(fx, tmp_path / "paper", ds, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state",
                 "--privacy", "smplora", "--privacy_attacker_lr", "1e-3", *SMALL)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-6000:]
    assert "mia_ce=" in a.stdout + a.stderr
    meta = header(tmp_path / "paper" / "sdxl.safetensors")
    assert meta["smplora.method"] == "smp-lora" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    metrics = json.loads(meta["smplora.metrics"])
    assert metrics["attacker_updates"] == 2 and finite(metrics)
    assert json.loads(meta["smplora.data"])["counts"] == {"member": 6, "nonmember": 4}
    assert (tmp_path / "paper" / "sdxl-step00000001.smplora_state").is_file()
    assert (tmp_path / "paper" / "sdxl-state" / "smplora_state.safetensors").is_file()
    # 2. the same command without privacy: kohya's own header keys are the same
    b = run_sdxl(fx, tmp_path / "plain", ds, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state",
                 "--privacy", "none")
    assert b.returncode == 0, b.stderr[-6000:]
    plain = header(tmp_path / "plain" / "sdxl.safetensors")
    assert not any(k.startswith("smplora.") for k in plain)
    assert {k: v for k, v in meta.items() if not k.startswith("smplora.") and k not in VOLATILE} == \
        {k: v for k, v in plain.items() if k not in VOLATILE}
    # 3. robust preset (base forward with the LoRA switched off, replayed at the same noise), then --resume
    c = run_sdxl(fx, tmp_path / "robust", ds, "--max_train_steps", "2", "--save_state", "--privacy", "smplora",
                 "--privacy_preset", "robust", *SMALL)
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-6000:]
    assert "base-calibrated features" in c.stdout + c.stderr
    cfg = json.loads(header(tmp_path / "robust" / "sdxl.safetensors")["smplora.config"])
    assert cfg["calibrated"] is True and cfg["privacy_fraction"] == 0.25
    d = run_sdxl(fx, tmp_path / "resumed", ds, "--max_train_steps", "3", "--resume",
                 str(tmp_path / "robust" / "sdxl-state"),
                 "--privacy", "smplora", "--privacy_preset", "robust", *SMALL)
    assert d.returncode == 0, d.stderr[-6000:]
    assert "attacker state restored" in d.stdout + d.stderr
    resumed = json.loads(header(tmp_path / "resumed" / "sdxl.safetensors")["smplora.metrics"])
    assert resumed["attacker_updates"] > 2 and finite(resumed)   # continued from the 2 updates of run 3
