"""smplora-kohya against a real kohya sd-scripts checkout (opt-in, slow, offline, CPU).

Skipped unless SD_SCRIPTS_DIR points to an sd-scripts checkout (v0.10.0 or newer). Runs the real
`train_network.py` through the launcher on a tiny SD1.5-style diffusers model built by
scripts/kohya/make_tiny_sd15.py (random weights; SD1.x UNet block widths, tiny text encoder and
VAE) with an offline tokenizer. Environment:

- SD_SCRIPTS_DIR        the checkout (required)
- SD_SCRIPTS_PYTHON     a Python with sd-scripts' requirements and smplora-plugin installed
                        (default: this interpreter)
- SMPLORA_KOHYA_FIXTURE a folder made by make_tiny_sd15.py to reuse (default: built in a tmp dir;
                        about 3 GB and a minute)
- SD_SCRIPTS_OLD_DIR    optional: a checkout older than v0.10.0, which must be refused

Example::

    SD_SCRIPTS_DIR=~/sd-scripts SD_SCRIPTS_PYTHON=~/sd-scripts/venv/bin/python \\
        python -m pytest -m sdscripts tests/test_kohya_real.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sdscripts, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("SD_SCRIPTS_DIR"),
                                 reason="needs SD_SCRIPTS_DIR (a kohya sd-scripts checkout)")]

REPO = Path(__file__).resolve().parents[1]
PY = os.environ.get("SD_SCRIPTS_PYTHON", sys.executable)
VOLATILE = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "sshs_model_hash",
            "sshs_legacy_hash", "modelspec.date", "ss_sd_scripts_commit_hash"}


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    reuse = os.environ.get("SMPLORA_KOHYA_FIXTURE")
    if reuse and (Path(reuse) / "model" / "unet").is_dir():
        return Path(reuse)
    out = tmp_path_factory.mktemp("kohya_fixture")
    subprocess.run([PY, str(REPO / "scripts" / "kohya" / "make_tiny_sd15.py"), str(out)], check=True, timeout=900)
    return out


def run_kohya(fx: Path, out: Path, *extra: str, script: str = "train_network.py", sd_dir=None, timeout=1800):
    # COLUMNS: kohya's rich logger wraps at 80 columns without a terminal, splitting the lines tests look for
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "400"}
    cmd = [PY, "-m", "smplora_plugin.integrations.kohya", "--sd_scripts", sd_dir or os.environ["SD_SCRIPTS_DIR"],
           script, "--pretrained_model_name_or_path", str(fx / "model"), "--tokenizer_cache_dir",
           str(fx / "tokenizers"), "--resolution", "64", "--caption_extension", ".caption", "--output_dir", str(out),
           "--output_name", "tiny", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
           "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--train_batch_size", "2", "--mixed_precision", "no",
           "--max_data_loader_n_workers", "0", "--seed", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(out.parent))


def header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def dataset_toml(fx: Path, path: Path) -> Path:
    path.write_text(
        "[general]\ncaption_extension = '.caption'\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\n"
        f"image_dir = '{fx}/train/5_tiny'\nnum_repeats = 5\n\n"
        f"[[datasets]]\nresolution = 64\nbatch_size = 2\nvalidation_split = 1.0\n"
        f"[[datasets.subsets]]\nimage_dir = '{fx}/holdout/1_tiny'\nnum_repeats = 1\n")
    return path


PRIV = ["--privacy", "smplora", "--privacy_alpha", "0.5", "--privacy_attacker_lr", "1e-3",
        "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32,16"]


def test_real_train_network_privacy_metadata_and_resume(fixture_dir, tmp_path):
    fx = fixture_dir
    ds = dataset_toml(fx, tmp_path / "dataset.toml")
    # 1. privacy on, non-members from a validation_split = 1.0 dataset block, --save_state
    a = run_kohya(fx, tmp_path / "a", "--dataset_config", str(ds), "--max_train_steps", "2", "--save_every_n_steps",
                  "1",
                  "--save_state", *PRIV)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-6000:]
    log = a.stdout + a.stderr
    assert "NEVER trained on" in log and "mia_ce=" in log
    meta = header(tmp_path / "a" / "tiny.safetensors")
    assert meta["smplora.method"] == "smp-lora"
    assert json.loads(meta["smplora.metrics"])["attacker_updates"] == 2
    assert json.loads(meta["smplora.data"])["counts"] == {"member": 6, "nonmember": 4}
    assert (tmp_path / "a" / "tiny-step00000001.smplora_state").is_file()
    assert (tmp_path / "a" / "tiny-state" / "smplora_state.safetensors").is_file()
    # 2. the same run without privacy: kohya's own keys are the same, smplora.* only with privacy
    b = run_kohya(fx, tmp_path / "b", "--dataset_config", str(ds), "--max_train_steps", "2", "--privacy", "none")
    assert b.returncode == 0, b.stderr[-6000:]
    plain = header(tmp_path / "b" / "tiny.safetensors")
    assert not any(k.startswith("smplora.") for k in plain)
    kohya_keys = {k: v for k, v in meta.items() if not k.startswith("smplora.") and k not in VOLATILE}
    assert kohya_keys == {k: v for k, v in plain.items() if k not in VOLATILE}
    assert sum(k.startswith("ss_") for k in plain) > 40
    # 3. --resume continues the attacker; non-members now from --privacy_holdout_dir (kohya folder layout)
    c = run_kohya(fx, tmp_path / "c", "--train_data_dir", str(fx / "train"), "--reg_data_dir", str(fx / "reg"),
                  "--max_train_steps", "3", "--resume", str(tmp_path / "a" / "tiny-state"),
                  "--privacy_holdout_dir", str(fx / "holdout"), *PRIV)
    assert c.returncode == 0, c.stderr[-6000:]
    assert "attacker state restored" in c.stdout + c.stderr
    meta_c = header(tmp_path / "c" / "tiny.safetensors")
    metrics_c = json.loads(meta_c["smplora.metrics"])
    assert metrics_c["attacker_updates"] > 2          # continued from the 2 updates of run 1
    assert json.loads(meta_c["smplora.data"])["counts"] == {"member": 6, "nonmember": 4, "regularization": 2}


def test_real_header_with_holdout_dir_equals_header_without(fixture_dir, tmp_path):
    """issue 13: --privacy_holdout_dir reaches kohya as a dataset config, which would change kohya's ss_* keys;
    the header must equal the one of the same --train_data_dir command without --privacy (apart from
    smplora.* and per-run values), and a refused run must leave no file."""
    fx = fixture_dir
    common = ["--train_data_dir", str(fx / "train"), "--reg_data_dir", str(fx / "reg"), "--max_train_steps", "2",
              "--flip_aug", "--keep_tokens", "1"]
    plain_run = run_kohya(fx, tmp_path / "plain", *common, "--privacy", "none")
    assert plain_run.returncode == 0, plain_run.stderr[-6000:]
    priv_run = run_kohya(fx, tmp_path / "priv", *common, "--privacy_holdout_dir", str(fx / "holdout"), *PRIV)
    assert priv_run.returncode == 0, priv_run.stderr[-6000:]
    plain, priv = header(tmp_path / "plain" / "tiny.safetensors"), header(tmp_path / "priv" / "tiny.safetensors")
    assert {k: v for k, v in priv.items() if not k.startswith("smplora.") and k not in VOLATILE} == \
        {k: v for k, v in plain.items() if k not in VOLATILE}
    assert "ss_resolution" in priv and "ss_bucket_info" in priv and "ss_datasets" not in priv
    assert json.loads(priv["smplora.data"])["counts"]["nonmember"] == 4
    # kohya's rich log handler wraps the warning to the terminal width (and the caller's file:line shifts it)
    assert "empty training side" in " ".join((priv_run.stdout + priv_run.stderr).split())
    # the same command with a holdout image that is also a training image: refused, nothing written
    bad = tmp_path / "bad_holdout" / "1_tiny"
    shutil.copytree(fx / "holdout" / "1_tiny", bad)
    first = sorted((fx / "train" / "5_tiny").glob("*.png"))[0]
    shutil.copy(first, bad / "dup.png")
    refused = run_kohya(fx, tmp_path / "refused", *common, "--privacy_holdout_dir", str(bad.parent), *PRIV)
    assert refused.returncode == 2 and "byte-identical" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_real_bad_input_fails_before_training(fixture_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_kohya(fixture_dir, tmp_path / "o", "--train_data_dir", str(fixture_dir / "train"), "--max_train_steps", "1",
                  "--privacy", "smplora", "--privacy_holdout_dir", str(tmp_path / "empty"))
    assert r.returncode == 2 and "holds no images" in r.stderr
    assert "load Diffusers pretrained models" not in r.stdout + r.stderr
    r = run_kohya(fixture_dir, tmp_path / "o", "--train_data_dir", str(fixture_dir / "train"), "--max_train_steps", "1",
                  "--privacy", "smplora", "--privacy_holdout_dir", str(fixture_dir / "train"))
    assert r.returncode == 2 and "byte-identical" in r.stderr
    assert "load Diffusers pretrained models" not in r.stdout + r.stderr


@pytest.mark.skipif(not os.environ.get("SD_SCRIPTS_OLD_DIR"), reason="needs SD_SCRIPTS_OLD_DIR (sd-scripts < v0.10.0)")
def test_real_old_checkout_is_refused(fixture_dir, tmp_path):
    r = run_kohya(fixture_dir, tmp_path / "o", "--train_data_dir", str(fixture_dir / "train"), "--privacy", "smplora",
                  sd_dir=os.environ["SD_SCRIPTS_OLD_DIR"])
    assert r.returncode == 3 and "v0.10.0" in r.stderr, r.stderr[-3000:]


def test_real_robust_preset_calibrated_run_and_resume(fixture_dir, tmp_path):
    """--privacy_preset robust from a [smplora] TOML section (CLI on top): the base forward with sd-scripts'
    network.set_multiplier(0.0), replayed at the same noise and timesteps (checked on every batch), trains,
    saves and resumes; the privacy term sees the first quarter of each batch (privacy_fraction 0.25)."""
    from smplora_plugin.config import PrivacyConfig

    robust = PrivacyConfig.preset("robust")
    fx = fixture_dir
    ds = dataset_toml(fx, tmp_path / "dataset.toml")
    toml = tmp_path / "smplora.toml"
    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_preset = "robust"\nprivacy_feature_grid = 8\n'
                    'privacy_attacker_hidden = [32, 16]\n')
    a = run_kohya(fx, tmp_path / "a", "--config_file", str(toml), "--dataset_config", str(ds), "--max_train_steps", "2",
                  "--save_state", "--privacy_alpha", "2")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-6000:]
    assert "base-calibrated features" in a.stdout + a.stderr
    meta = header(tmp_path / "a" / "tiny.safetensors")
    cfg = json.loads(meta["smplora.config"])
    assert cfg["calibrated"] is True and cfg["alpha"] == 2.0 and cfg["attacker_lr"] == robust.attacker_lr
    assert cfg["feature_grid"] == [8, 8] and cfg["privacy_fraction"] == robust.privacy_fraction == 0.25
    assert "privacy fraction 0.25" in a.stdout + a.stderr
    # batches of 2, the fraction 0.25 over steps: one member row on step 0, none on step 1 (no attacker update);
    # the one held-out refresh (nonmember_every 4) cut to 1 of its 2 images
    assert json.loads(meta["smplora.data"])["feature_rows"] == {"member": 1, "nonmember": 1}
    metrics = json.loads(meta["smplora.metrics"])
    assert metrics["attacker_updates"] == 1 and all(v == v and abs(v) != float("inf") for v in metrics.values())
    assert (tmp_path / "a" / "tiny-state" / "smplora_state.safetensors").is_file()
    c = run_kohya(fx, tmp_path / "c", "--dataset_config", str(ds), "--max_train_steps", "3", "--resume",
                  str(tmp_path / "a" / "tiny-state"), "--privacy", "smplora", "--privacy_preset", "robust",
                  "--privacy_alpha", "2", "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32,16")
    assert c.returncode == 0, c.stderr[-6000:]
    assert "attacker state restored" in c.stdout + c.stderr
    metrics_c = json.loads(header(tmp_path / "c" / "tiny.safetensors")["smplora.metrics"])
    assert metrics_c["attacker_updates"] == 3         # continued: the schedule's rows on steps 2 and 4 of 2-4
