"""diffusers' own SD1, SDXL and FLUX LoRA scripts with the SMP-LoRA lines, on tiny offline pipelines (hand-run).

Runs only when DIFFUSERS_EXAMPLES_DIR points to the ``examples`` folder of a diffusers checkout (the
scripts need torchvision and, for SDXL, ``datasets``)::

    DIFFUSERS_EXAMPLES_DIR=/path/to/diffusers/examples pytest -q tests/test_diffusers_official.py

Each official script is copied to a temporary folder and patched there by
``examples/diffusers/patch_official.py`` (the lines of PATCH.md / PATCH_SDXL.md / PATCH_FLUX.md), so no
line of it ships with this project. It then trains 4 optimiser steps with ``--privacy smplora
--privacy_preset robust`` on a tiny pipeline (:mod:`smplora_plugin.tiny_sd` / :mod:`smplora_plugin.tiny_xl`),
checkpointing at step 2 (an epoch boundary); a second run resumes from that checkpoint and must end with
the same LoRA and the same attacker state. FLUX runs DreamBooth with prior preservation (only the instance half
reaches the attacker); a third FLUX run covers ``--cache_latents`` with gradient accumulation and the paper preset.
The SD1 script also trains with ``--privacy dpsgd --privacy_noise_multiplier 1.0`` (DP-SGD through the same lines:
``smplora.dp`` in the header, the epsilon printed with its sampling note, the DP state in every checkpoint, and a
resume with another sigma refused before the script writes anything).
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

EXAMPLES = os.environ.get("DIFFUSERS_EXAMPLES_DIR")
pytestmark = pytest.mark.skipif(not EXAMPLES, reason="set DIFFUSERS_EXAMPLES_DIR to diffusers' examples folder")

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
PRIV = ["--privacy", "smplora", "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32", "16"]


def _patched(kind, rel, dest):
    spec = importlib.util.spec_from_file_location("_patch_official",
                                                  REPO / "examples" / "diffusers" / "patch_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = Path(EXAMPLES) / rel
    if not src.is_file():
        pytest.fail(f"DIFFUSERS_EXAMPLES_DIR={EXAMPLES} has no {rel}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(mod.PATCHERS[kind](src.read_text(encoding="utf-8")), encoding="utf-8")
    return dest


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SMPLORA_DISABLE_PLUGINS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(script, args):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _images_only(folder, n, start):
    from smplora_plugin.tiny_sd import write_digit_images

    write_digit_images(folder, n=n, start=start, size=32)
    for f in Path(folder).iterdir():   # DreamBooth folders are read whole: images only
        if f.suffix != ".png":
            f.unlink()
    return folder


def _train_and_resume(script, common, root):
    a = _run(script, [*common, "--output_dir", root / "outA"])
    (root / "outB").mkdir()
    shutil.copytree(root / "outA" / "checkpoint-2", root / "outB" / "checkpoint-2")
    b = _run(script, [*common, "--output_dir", root / "outB", "--resume_from_checkpoint", "latest"])
    assert "Resuming from checkpoint checkpoint-2" in b.stdout + b.stderr
    return a, b


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _check_run(root, out, *, robust=True, updates=STEPS):
    """The LoRA trained and is annotated; every checkpoint holds the attacker state."""
    lora_path = root / out / "pytorch_lora_weights.safetensors"
    lora = _load(lora_path)
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(v.abs().max().item() for v in ups) > 0
    meta = _header(lora_path)
    cfg, metrics = json.loads(meta["smplora.config"]), json.loads(meta["smplora.metrics"])
    assert meta["smplora.method"] == "smp-lora" and metrics["attacker_updates"] == updates
    if robust:   # calibrated=True makes reg.features refuse a missing or whole-batch base prediction
        assert (cfg["calibrated"], cfg["alpha"], cfg["privacy_fraction"]) == (True, 20.0, 0.25)
    for step in (2, 4):
        state = root / out / f"checkpoint-{step}" / "smplora_state.safetensors"
        assert state.is_file() and any(k.startswith("attacker.") for k in _load(state))
        assert not list((root / out / f"checkpoint-{step}").glob("custom_checkpoint*"))
    # the trackers (tensorboard, the scripts' default) got the smplora/* metrics
    events = b"".join(p.read_bytes() for p in (root / out / "logs").rglob("events.out.tfevents*"))
    assert b"smplora/attacker_ce_member" in events


def _same_files(root, *rels):
    for rel in rels:
        ta, tb = _load(root / "outA" / rel), _load(root / "outB" / rel)
        assert set(ta) == set(tb) and ta, rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}:{k} differs after resume"


def test_sd1_text_to_image_lora(tmp_path):
    """The README's block (PATCH.md) in the official SD1.x script, on the tiny SD pipeline."""
    from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images

    script = _patched("sd1", "text_to_image/train_text_to_image_lora.py", tmp_path / "scripts" / "sd1.py")
    save_tiny_pipeline(tmp_path / "pipeline")
    write_digit_images(tmp_path / "train", n=8, start=0, size=32)
    write_digit_images(tmp_path / "holdout", n=8, start=8, size=32)
    common = ["--pretrained_model_name_or_path", tmp_path / "pipeline", "--train_data_dir", tmp_path / "train",
              "--resolution", "32", "--center_crop", "--train_batch_size", "4", "--max_train_steps", STEPS,
              "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
              "--rank", "4", *PRIV, "--privacy_preset", "robust", "--privacy_holdout_dir", tmp_path / "holdout"]
    a, _ = _train_and_resume(script, common, tmp_path)
    assert "mia_ce=" in a.stderr and "SMP-LoRA" in a.stdout
    _check_run(tmp_path, "outA")
    _check_run(tmp_path, "outB")
    _same_files(tmp_path, "pytorch_lora_weights.safetensors", "checkpoint-4/smplora_state.safetensors")


def test_sd1_text_to_image_lora_dpsgd(tmp_path):
    """The same block, with DP-SGD alone (no holdout): per-sample clipping and noise on the official loop."""
    from smplora_plugin import read_privacy_metadata
    from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images

    script = _patched("sd1", "text_to_image/train_text_to_image_lora.py", tmp_path / "scripts" / "sd1.py")
    save_tiny_pipeline(tmp_path / "pipeline")
    write_digit_images(tmp_path / "train", n=8, start=0, size=32)
    common = ["--pretrained_model_name_or_path", tmp_path / "pipeline", "--train_data_dir", tmp_path / "train",
              "--resolution", "32", "--center_crop", "--train_batch_size", "4", "--max_train_steps", STEPS,
              "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
              "--rank", "4", "--privacy", "dpsgd", "--privacy_max_grad_norm", "0.1"]
    a = _run(script, [*common, "--privacy_noise_multiplier", "1.0", "--output_dir", tmp_path / "outA"])
    lora_path = tmp_path / "outA" / "pytorch_lora_weights.safetensors"
    meta = read_privacy_metadata(lora_path)
    dp = json.loads(meta["smplora.dp"])
    assert meta["smplora.method"] == "dp-sgd"
    assert (dp["objective"], dp["sigma"], dp["clip"], dp["steps"], dp["dataset_size"], dp["expected_batch_size"],
            dp["sampling"]) == ("dp-sgd", 1.0, 0.1, STEPS, 8, 4.0, "fixed_batch")
    assert dp["epsilon"] > 0 and "do not satisfy its assumption" in dp["assumption"]
    closing = [ln for ln in a.stdout.splitlines() if ln.startswith("smplora DP: ")]
    assert len(closing) == 1 and f"dp-sgd: epsilon {dp['epsilon']:.4g} at delta" in closing[0]
    assert "the run's fixed-size batches do not satisfy its assumption" in closing[0]
    assert "DP-SGD (smplora-plugin" in a.stdout and "eps=" in a.stderr and "mia_ce" not in a.stderr
    ups = [v for k, v in _load(lora_path).items() if "lora_B" in k or "lora.up" in k]
    assert ups and max(v.abs().max().item() for v in ups) > 0
    for step in (2, 4):
        assert (tmp_path / "outA" / f"checkpoint-{step}" / "smplora_dp_state.safetensors").is_file()
    events = b"".join(p.read_bytes() for p in (tmp_path / "outA" / "logs").rglob("events.out.tfevents*"))
    assert b"smplora/epsilon" in events
    # a resume with another sigma is refused when the shim is attached: nothing is written
    (tmp_path / "outB").mkdir()
    shutil.copytree(tmp_path / "outA" / "checkpoint-2", tmp_path / "outB" / "checkpoint-2")
    before = sorted(p for p in (tmp_path / "outB").rglob("*") if p.is_file())
    proc = subprocess.run([sys.executable, str(script), *map(str, common), "--privacy_noise_multiplier", "2.0",
                           "--output_dir", str(tmp_path / "outB"), "--resume_from_checkpoint", "latest"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "DPError" in proc.stderr and "sigma: saved 1.0 vs this 2.0" in proc.stderr
    assert sorted(p for p in (tmp_path / "outB").rglob("*") if p.is_file()) == before


def test_sdxl_text_to_image_lora(tmp_path):
    from smplora_plugin.tiny_sd import write_digit_images
    from smplora_plugin.tiny_xl import save_tiny_sdxl_pipeline

    script = _patched("sdxl", "text_to_image/train_text_to_image_lora_sdxl.py", tmp_path / "scripts" / "sdxl.py")
    save_tiny_sdxl_pipeline(tmp_path / "pipeline")
    write_digit_images(tmp_path / "train", n=8, start=0, size=32)
    write_digit_images(tmp_path / "holdout", n=8, start=8, size=32)
    common = ["--pretrained_model_name_or_path", tmp_path / "pipeline", "--train_data_dir", tmp_path / "train",
              "--resolution", "32", "--center_crop", "--train_batch_size", "4", "--max_train_steps", STEPS,
              "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
              "--rank", "4", *PRIV, "--privacy_preset", "robust", "--privacy_holdout_dir", tmp_path / "holdout"]
    a, b = _train_and_resume(script, common, tmp_path)
    assert "mia_ce=" in a.stderr and "mia_acc=" in a.stderr and "SMP-LoRA" in a.stdout
    _check_run(tmp_path, "outA")
    _check_run(tmp_path, "outB")
    _same_files(tmp_path, "pytorch_lora_weights.safetensors", "checkpoint-4/smplora_state.safetensors")


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    from smplora_plugin.tiny_xl import TinyFluxConfig, save_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("flux")
    # the script tokenizes CLIP prompts to 77 tokens: the tiny CLIP gets 77 positions
    save_tiny_flux_pipeline(root / "pipeline", TinyFluxConfig(max_length=77))
    _images_only(root / "instance", 8, 0)
    _images_only(root / "holdout", 8, 8)
    _images_only(root / "class", 4, 16)
    script = _patched("flux", "dreambooth/train_dreambooth_lora_flux.py", root / "scripts" / "flux.py")
    common = ["--pretrained_model_name_or_path", root / "pipeline", "--instance_data_dir", root / "instance",
              "--instance_prompt", "a photo of sks digit", "--resolution", "32", "--center_crop",
              "--max_train_steps", STEPS, "--checkpointing_steps", "2", "--learning_rate", "1e-3",
              "--lr_warmup_steps", "0", "--seed", "0", "--rank", "4", "--max_sequence_length", "32", *PRIV,
              "--privacy_holdout_dir", root / "holdout"]
    return root, script, common


def test_flux_dreambooth_lora_with_prior_preservation(flux_data, tmp_path):
    root, script, common = flux_data
    common = [*common, "--train_batch_size", "4", "--privacy_preset", "robust", "--with_prior_preservation",
              "--class_data_dir", root / "class", "--class_prompt", "a photo of a digit", "--num_class_images", "4"]
    a, _ = _train_and_resume(script, common, tmp_path)
    assert "mia_ce=" in a.stderr and "SMP-LoRA" in a.stdout
    _check_run(tmp_path, "outA")
    _check_run(tmp_path, "outB")
    _same_files(tmp_path, "pytorch_lora_weights.safetensors", "checkpoint-4/smplora_state.safetensors")
    cursor = json.loads(_header(tmp_path / "outA" / "checkpoint-4" / "smplora_state.safetensors")
                        ["shim.diffusers.holdout"])
    assert cursor["batch_size"] == 1          # ceil(0.25 * 4 instance images), class images not counted


def test_flux_cached_latents_with_accumulation(flux_data, tmp_path):
    """--cache_latents: held-out batches are encoded, not read from the training cache; the attacker
    updates once per optimiser step under gradient accumulation."""
    root, script, common = flux_data
    _run(script, [*common, "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--cache_latents",
                  "--privacy_nonmember_every", "1", "--output_dir", tmp_path / "outA"])
    _check_run(tmp_path, "outA", robust=False)
    cursor = json.loads(_header(tmp_path / "outA" / "checkpoint-4" / "smplora_state.safetensors")
                        ["shim.diffusers.holdout"])
    assert cursor["draws"] == STEPS and cursor["batch_size"] == 2
