"""The sd_trainer_smplora process in a real ostris/ai-toolkit checkout (opt-in, slow, offline, CPU).

Skipped unless AI_TOOLKIT_DIR (the checkout; tested: 27a03a91) and AI_TOOLKIT_PYTHON (a Python with ai-toolkit's
requirements and smplora-plugin installed) are set. The checkout is copied to a temporary folder and the extension
installed there with `smplora-ai-toolkit install`; a tiny random SD1.x pipeline in diffusers layout
(smplora_plugin.tiny_sd) and 32 px digits are built; ai-toolkit's own run.py then trains:

1. plain: type sd_trainer, 4 steps, a checkpoint at step 2;
2. privacy: type sd_trainer_smplora, privacy.preset robust, the same 4 steps and checkpoint;
3. the privacy run resumed to 6 steps (ai-toolkit resumes its newest checkpoint; the attacker state follows);
4. a bad privacy block, refused before ai-toolkit writes anything;

and `smplora audit --baseline` (this interpreter, which needs the [audit] extra) audits the privacy LoRA.
`test_dpsgd_run` (its own test: `-k dpsgd`) trains `privacy.method: dpsgd` for 4 steps (AI_TOOLKIT_PYTHON needs
opacus, the [dp] extra) and checks the header's epsilon against Opacus's accountant; `test_smplora_dp_noise_run`
(`-k dp_noise`) trains SMP-LoRA (robust) + DP noise for 4 steps.
Set SMPLORA_AITK_KEEP=DIR to keep everything (configs, logs, LoRAs, report.md) in DIR.

    AI_TOOLKIT_DIR=~/ai-toolkit AI_TOOLKIT_PYTHON=~/ai-toolkit/venv/bin/python \\
        python -m pytest -q -s tests/test_ai_toolkit_real.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (os.environ.get("AI_TOOLKIT_DIR") and os.environ.get("AI_TOOLKIT_PYTHON")),
                                 reason="needs AI_TOOLKIT_DIR (an ostris/ai-toolkit checkout) and AI_TOOLKIT_PYTHON")]

PY = os.environ.get("AI_TOOLKIT_PYTHON", "")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}
N_TRAIN, N_HOLDOUT = 12, 12
VOLATILE = {"sshs_model_hash", "sshs_legacy_hash"}


def log(message: str) -> None:
    print(f"[ai-toolkit real] {message}", flush=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    keep = os.environ.get("SMPLORA_AITK_KEEP")
    root = Path(keep) if keep else tmp_path_factory.mktemp("aitk_real")
    root.mkdir(parents=True, exist_ok=True)
    checkout = root / "ai-toolkit"
    if checkout.exists():
        shutil.rmtree(checkout)
    shutil.copytree(os.environ["AI_TOOLKIT_DIR"], checkout,
                    ignore=shutil.ignore_patterns(".git", "output", "node_modules", "__pycache__"))
    done = subprocess.run([PY, "-m", "smplora_plugin.integrations.ai_toolkit.install", "install", str(checkout)],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    log(done.stdout.strip())
    fx = root / "fixture"
    if not (fx / "model" / "unet").is_dir():
        code = ("import sys; from pathlib import Path\n"
                "from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images\n"
                "fx = Path(sys.argv[1]); save_tiny_pipeline(fx / 'model')\n"
                f"write_digit_images(fx / 'train', n={N_TRAIN}, start=0, size=32, metadata_jsonl=False)\n"
                f"write_digit_images(fx / 'holdout', n={N_HOLDOUT}, start={N_TRAIN}, size=32, metadata_jsonl=False)\n")
        made = subprocess.run([PY, "-c", code, str(fx)], capture_output=True, text=True, env=ENV, timeout=900)
        assert made.returncode == 0, made.stderr[-3000:]
    return {"root": root, "checkout": checkout, "fx": fx, "out": root / "out"}


def config(env, name: str, process_type: str, steps: int, privacy=None) -> Path:
    proc = {
        "type": process_type, "training_folder": str(env["out"]), "device": "cpu", "training_seed": 1,
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float32", "save_every": 2, "max_step_saves_to_keep": 4},
        "datasets": [{"folder_path": str(env["fx"] / "train"), "caption_ext": "txt", "caption_dropout_rate": 0.0,
                      "cache_latents_to_disk": False, "resolution": [32]}],
        "train": {"batch_size": 2, "steps": steps, "gradient_accumulation_steps": 1, "train_unet": True,
                  "train_text_encoder": False, "gradient_checkpointing": False, "noise_scheduler": "ddpm",
                  "optimizer": "adamw", "lr": 1e-3, "dtype": "fp32", "disable_sampling": True},
        "model": {"name_or_path": str(env["fx"] / "model"), "arch": "sd1"},
    }
    if privacy is not None:
        proc["privacy"] = privacy
    path = env["root"] / f"{name}_{steps}.yaml"     # JSON is YAML
    path.write_text(json.dumps({"job": "extension", "config": {"name": name, "process": [proc]},
                                "meta": {"name": "[name]", "version": "1.0"}}, indent=2))
    return path


def run_toolkit(env, cfg: Path, timeout: int = 1800):
    start = time.time()
    done = subprocess.run([PY, "run.py", str(cfg)], capture_output=True, text=True, env=ENV,
                          cwd=str(env["checkout"]), timeout=timeout)
    (cfg.with_suffix(".log")).write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    log(f"{cfg.name}: exit {done.returncode} in {time.time() - start:.1f} s")
    return done


def header(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def privacy_block(env):
    return {"method": "smplora", "preset": "robust", "holdout_folder": str(env["fx"] / "holdout"),
            "feature_grid": 8, "hidden": [32, 16]}


def test_plain_privacy_resume_audit(env):
    plain = run_toolkit(env, config(env, "plain", "sd_trainer", 4))
    assert plain.returncode == 0, plain.stderr[-3000:]
    smp = run_toolkit(env, config(env, "smp", "sd_trainer_smplora", 4, privacy_block(env)))
    assert smp.returncode == 0, smp.stderr[-3000:]
    out = smp.stdout + smp.stderr
    assert "mia_ce: " in out and "mia_acc: " in out and " loss: " in out
    assert "mia_ce" not in plain.stdout + plain.stderr
    p_root, s_root = env["out"] / "plain", env["out"] / "smp"
    for p_file, s_file in (("plain_000000002.safetensors", "smp_000000002.safetensors"),
                           ("plain.safetensors", "smp.safetensors")):
        p_head, s_head = header(p_root / p_file), header(s_root / s_file)
        ours = {k for k in s_head if k.startswith("smplora.")}
        assert {"smplora.config", "smplora.metrics", "smplora.integration", "smplora.data"} <= ours
        renamed = {k: v.replace("smp", "plain") if k in ("name", "ss_output_name") else v
                   for k, v in s_head.items() if k not in ours and k not in VOLATILE}
        assert renamed == {k: v for k, v in p_head.items() if k not in VOLATILE}
    metrics = json.loads(header(s_root / "smp.safetensors")["smplora.metrics"])
    assert metrics["step"] == 4.0 and metrics["attacker_updates"] == 2.0   # robust: a quarter of batch 2
    states = sorted(p.name for p in (s_root / "_smplora").glob("*.smplora_state"))
    assert states == ["smp.smplora_state", "smp_000000002.smplora_state"]
    assert json.loads((s_root / "_smplora" / "holdout_manifest.json").read_text())["sets"]["nonmember"]

    resumed = run_toolkit(env, config(env, "smp", "sd_trainer_smplora", 6, privacy_block(env)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "attacker state restored from" in resumed.stdout and "RESUMING FROM" in resumed.stdout
    head = header(s_root / "smp.safetensors")
    assert json.loads(head["smplora.metrics"])["step"] == 6.0
    assert json.loads(head["smplora.data"])["resumed_from_step"] == 4
    assert json.loads(head["training_info"])["step"] == 6

    bad = run_toolkit(env, config(env, "bad", "sd_trainer_smplora", 4, {**privacy_block(env), "alpha": -1}))
    assert bad.returncode != 0 and "privacy.alpha" in bad.stdout + bad.stderr
    assert not (env["out"] / "bad").exists()

    audit_dir = env["root"] / "audit"
    start = time.time()
    audit = subprocess.run([sys.executable, "-m", "smplora_plugin.cli", "audit", "--base-model",
                            str(env["fx"] / "model"), "--lora", str(s_root / "smp.safetensors"), "--members",
                            str(env["fx"] / "train"), "--nonmembers", str(env["fx"] / "holdout"), "--out",
                            str(audit_dir), "--baseline"], capture_output=True, text=True, env=ENV, timeout=1800)
    log(f"smplora audit: exit {audit.returncode} in {time.time() - start:.1f} s")
    assert audit.returncode == 0, audit.stderr[-3000:]
    report = (audit_dir / "report.md").read_text()
    verdicts = [line for line in report.splitlines() if "erdict" in line or "evidence" in line or "leak" in line]
    assert verdicts
    for line in verdicts[:6]:
        log(f"report.md: {line}")


def test_dpsgd_run(env):
    """privacy.method: dpsgd in ai-toolkit: its own loss, per-sample gradients by hooks on its LoRAModule layers,
    the noised step, epsilon in the bar and the header (checked against Opacus's RDP accountant), DP states."""
    from opacus.accountants import RDPAccountant

    block = {"method": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    dp = run_toolkit(env, config(env, "dpsgd", "sd_trainer_smplora", 4, block))
    assert dp.returncode == 0, dp.stderr[-3000:]
    out = dp.stdout + dp.stderr
    assert "eps: " in out and " loss: " in out and "mia_ce" not in out
    assert "DP-SGD alone" in dp.stdout and "DP sampling: " in dp.stdout
    root = env["out"] / "dpsgd"
    head = header(root / "dpsgd.safetensors")
    meta = json.loads(head["smplora.dp"])
    assert (meta["steps"], meta["sigma"], meta["clip"], meta["dataset_size"], meta["expected_batch_size"]) == (
        4, 1.0, 1.0, N_TRAIN, 2)
    acc = RDPAccountant()
    acc.history = [(1.0, 2 / N_TRAIN, 4)]
    assert meta["epsilon"] == pytest.approx(acc.get_epsilon(delta=meta["delta"]), rel=1e-6)
    assert head["smplora.method"] == "dp-sgd"
    assert sorted(p.name for p in (root / "_smplora").glob("*.smplora_dp")) == [
        "dpsgd.smplora_dp", "dpsgd_000000002.smplora_dp"]
    from safetensors.torch import load_file

    first, last = load_file(str(root / "dpsgd_000000002.safetensors")), load_file(str(root / "dpsgd.safetensors"))
    assert any(not (first[k] == last[k]).all() for k in first)      # the noised steps moved the LoRA
    log(f"dpsgd: epsilon {meta['epsilon']:.4g} at delta {meta['delta']:.3g} after {meta['steps']} steps")


def test_smplora_dp_noise_run(env):
    """SMP-LoRA + DP noise in ai-toolkit: each image's own SMP-LoRA term (its loss checked against ai-toolkit's at
    every batch), the attacker updated every step (privacy fraction 1 under DP noise), epsilon in the header."""
    block = {**privacy_block(env), "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    done = run_toolkit(env, config(env, "smpdp", "sd_trainer_smplora", 4, block))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "mia_ce: " in out and "eps: " in out and "SMP-LoRA + DP noise" in done.stdout
    root = env["out"] / "smpdp"
    head = header(root / "smpdp.safetensors")
    meta, metrics = json.loads(head["smplora.dp"]), json.loads(head["smplora.metrics"])
    assert meta["steps"] == 4 and meta["objective"] and "caveat" in meta
    assert metrics["step"] == 4.0 and metrics["attacker_updates"] == 4.0
    assert sorted(p.suffix for p in (root / "_smplora").glob("smpdp.*")) == [".smplora_dp", ".smplora_state"]
    log(f"smplora + dp noise: epsilon {meta['epsilon']:.4g} after {meta['steps']} steps, "
        f"{metrics['attacker_updates']:g} attacker updates")
