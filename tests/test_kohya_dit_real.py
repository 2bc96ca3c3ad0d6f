"""smplora-kohya with the real ``flux_train_network.py`` and ``sd3_train_network.py`` (opt-in, slow, offline, CPU).

Skipped unless SD_SCRIPTS_DIR points to an sd-scripts checkout (v0.10.0 or newer) and SMPLORA_DIT_FIXTURE to a
folder made by ``scripts/kohya/make_random_flux_sd3.py`` (a 1 + 1-block FLUX, a depth-2 SD3 MMDiT and the full
T5-XXL, CLIP-L and CLIP-G that sd-scripts' loaders require: 12 GB on disk, about 11 GB of RAM per run).

    python scripts/kohya/make_random_flux_sd3.py /data/dit-fixture --sd_scripts ~/sd-scripts
    SD_SCRIPTS_DIR=~/sd-scripts SD_SCRIPTS_PYTHON=~/sd-scripts/venv/bin/python \\
        SMPLORA_DIT_FIXTURE=/data/dit-fixture python -m pytest -m sdscripts tests/test_kohya_dit_real.py
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
              pytest.mark.skipif(not (os.environ.get("SD_SCRIPTS_DIR") and os.environ.get("SMPLORA_DIT_FIXTURE")),
                                 reason="needs SD_SCRIPTS_DIR and SMPLORA_DIT_FIXTURE "
                                        "(made by make_random_flux_sd3.py)")]

PY = os.environ.get("SD_SCRIPTS_PYTHON", sys.executable)
VOLATILE = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "sshs_model_hash",
            "sshs_legacy_hash", "modelspec.date", "ss_sd_scripts_commit_hash"}
PRIV = ["--privacy", "smplora", "--privacy_alpha", "0.5", "--privacy_feature_grid", "8",
        "--privacy_attacker_hidden", "32,16"]


def model_args(fx: Path, arch: str) -> list:
    te = fx / "text_encoders"
    if arch == "flux":
        return ["flux_train_network.py", "--pretrained_model_name_or_path", str(fx / "flux" / "flux_1d1s.safetensors"),
                "--ae", str(fx / "flux" / "ae.safetensors"), "--clip_l", str(te / "clip_l.safetensors"),
                "--network_module", "networks.lora_flux"]
    return ["sd3_train_network.py", "--pretrained_model_name_or_path", str(fx / "sd3" / "sd3_depth2.safetensors"),
            "--clip_l", str(te / "clip_l.safetensors"), "--clip_g", str(te / "clip_g.safetensors"),
            "--network_module", "networks.lora_sd3"]


def run(fx: Path, arch: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    ds = out.parent / "dataset.toml"
    ds.write_text(
        "[general]\ncaption_extension = '.caption'\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{fx}/train/5_tiny'\n"
        "num_repeats = 5\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\nvalidation_split = 1.0\n"
        f"[[datasets.subsets]]\nimage_dir = '{fx}/holdout/1_tiny'\nnum_repeats = 1\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "400"}  # rich: no wrapping
    cmd = [PY, "-m", "smplora_plugin.integrations.kohya", "--sd_scripts", os.environ["SD_SCRIPTS_DIR"],
           *model_args(fx, arch), "--t5xxl", str(fx / "text_encoders" / "t5xxl.safetensors"),
           "--t5xxl_max_token_length", "16", "--tokenizer_cache_dir", str(fx / "tokenizers"), "--dataset_config",
           str(ds),
           "--output_dir", str(out), "--output_name", arch, "--network_dim", "4", "--network_alpha", "1",
           "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_data_loader_n_workers", "0", "--seed", "1",
           "--network_train_unet_only", "--validate_every_n_epochs", "1000", "--cache_latents",
           "--cache_text_encoder_outputs", "--mixed_precision", "bf16", "--full_bf16", "--max_train_steps", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=str(out.parent))


def header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_real_flow_matching_trainer_robust_and_header(arch, tmp_path):
    fx = Path(os.environ["SMPLORA_DIT_FIXTURE"])
    if not (fx / "text_encoders" / "t5xxl.safetensors").is_file():
        pytest.fail(f"{fx} is not a fixture made by scripts/kohya/make_random_flux_sd3.py")
    priv = run(fx, arch, tmp_path / "robust", *PRIV, "--privacy_preset", "robust", "--save_state")
    assert priv.returncode == 0, priv.stdout[-3000:] + priv.stderr[-6000:]
    log = priv.stdout + priv.stderr
    assert "base-calibrated features" in log and "did not call its 'unet' argument" not in log
    meta = header(tmp_path / "robust" / f"{arch}.safetensors")
    metrics = json.loads(meta["smplora.metrics"])
    assert metrics["attacker_updates"] == 2 and all(math.isfinite(v) for v in metrics.values())
    assert json.loads(meta["smplora.config"])["calibrated"] is True
    assert (tmp_path / "robust" / f"{arch}-state" / "smplora_state.safetensors").is_file()
    plain = run(fx, arch, tmp_path / "plain", "--privacy", "none", "--save_state")
    assert plain.returncode == 0, plain.stderr[-6000:]
    without = header(tmp_path / "plain" / f"{arch}.safetensors")
    assert not any(k.startswith("smplora.") for k in without)
    assert {k: v for k, v in meta.items() if not k.startswith("smplora.") and k not in VOLATILE} == \
        {k: v for k, v in without.items() if k not in VOLATILE}
