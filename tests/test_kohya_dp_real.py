"""DP-SGD (``--privacy dpsgd``) in real kohya sd-scripts ``train_network.py`` (opt-in, slow, offline, CPU).

Skipped unless SD_SCRIPTS_DIR points to an sd-scripts checkout; the same environment as
``tests/test_kohya_real.py`` (SD_SCRIPTS_PYTHON: a Python with sd-scripts' requirements, opacus and
smplora-plugin; SMPLORA_KOHYA_FIXTURE: a folder made by scripts/kohya/make_tiny_sd15.py to reuse).
The tiny SD1.5-block model of that fixture, sd-scripts' own ``networks.lora``, 64 px, batch 2, fp32::

    SD_SCRIPTS_DIR=~/sd-scripts SD_SCRIPTS_PYTHON=~/sd-scripts/venv/bin/python \\
        python -m pytest -q -s tests/test_kohya_dp_real.py
"""

from __future__ import annotations

import json
import math
import os

import pytest
from test_kohya_real import PY, fixture_dir, header, run_kohya  # noqa: F401

pytestmark = [pytest.mark.sdscripts, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("SD_SCRIPTS_DIR"),
                                 reason="needs SD_SCRIPTS_DIR (a kohya sd-scripts checkout)")]

DPSGD = ["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0", "--privacy_max_grad_norm", "1.0"]
ROWS = 30      # the fixture's 6 training images x 5 repeats (its 5_tiny folder)


def lora(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_dpsgd_run(fixture_dir, tmp_path):  # noqa: F811
    fx = fixture_dir
    a = run_kohya(fx, tmp_path / "a", "--train_data_dir", str(fx / "train"), "--max_train_steps", "3",
                  "--save_every_n_steps", "2", "--save_state", *DPSGD)
    log = " ".join((a.stdout + a.stderr).split())
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-6000:]
    assert "DP-SGD" in log and "eps=" in log and "sigma 1, per-sample clip 1, batch 2 of 30" in log
    assert "DP noise after training: dp-sgd: epsilon" in log and "fixed-size" in log
    meta = header(tmp_path / "a" / "tiny.safetensors")
    entry = json.loads(meta["smplora.dp"])
    assert meta["smplora.method"] == "dp-sgd" and "smplora.config" not in meta
    assert entry["objective"] == "dp-sgd" and entry["steps"] == 3 and entry["sigma"] == 1.0 and entry["clip"] == 1.0
    assert entry["sampling"] == "fixed_batch" and entry["dataset_size"] == ROWS and entry["expected_batch_size"] == 2
    assert entry["sample_rate"] == pytest.approx(2 / ROWS) and math.isfinite(entry["epsilon"]) and entry["epsilon"] > 0
    assert json.loads(header(tmp_path / "a" / "tiny-step00000002.safetensors")["smplora.dp"])["steps"] == 2
    assert sum(k.startswith("ss_") for k in meta) > 40                     # kohya's own header is there
    step2, final = lora(tmp_path / "a" / "tiny-step00000002.safetensors"), lora(tmp_path / "a" / "tiny.safetensors")
    assert step2.keys() == final.keys() and any(not (step2[k] == final[k]).all() for k in final)
    state_dir = tmp_path / "a" / "tiny-step00000002-state"
    assert (state_dir / "smplora_dp_state.safetensors").is_file() and (tmp_path / "a" / "tiny.smplora_dp").is_file()
    print(f"\n[dpsgd 3 steps] epsilon {entry['epsilon']:.4g} at delta {entry['delta']:.3g}; smplora.dp = "
          f"{meta['smplora.dp']}")
    # --resume from the step-2 state: kohya trains its max_train_steps again (without --skip_until_initial_step);
    # the accountant continues at 2
    c = run_kohya(fx, tmp_path / "c", "--train_data_dir", str(fx / "train"), "--max_train_steps", "3",
                  "--resume", str(state_dir), *DPSGD)
    assert c.returncode == 0, c.stderr[-6000:]
    assert "continued from a DP state of 2 steps" in " ".join((c.stdout + c.stderr).split())
    entry_c = json.loads(header(tmp_path / "c" / "tiny.safetensors")["smplora.dp"])
    assert entry_c["steps"] == 5 and entry_c["epsilon"] > entry["epsilon"]
    # the same resume with another sigma: refused before kohya loads anything, nothing written
    d = run_kohya(fx, tmp_path / "d", "--train_data_dir", str(fx / "train"), "--max_train_steps", "3",
                  "--resume", str(state_dir), *DPSGD[:2], "--privacy_noise_multiplier", "2.0")
    assert d.returncode == 2 and "--privacy_noise_multiplier 1.0 (this run: --privacy_noise_multiplier 2.0)" \
        in d.stderr, d.stderr[-3000:]
    assert "load Diffusers pretrained models" not in d.stdout + d.stderr and not (tmp_path / "d").exists()
