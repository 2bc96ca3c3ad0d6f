"""DP-SGD (and SMP-LoRA + DP noise) through the diffusers shim.

The options and every refusal before anything is built or written; one optimiser step through the shim, accelerate
and a peft LoRA on a tiny UNet moves every LoRA weight by exactly -(clipped per-sample sum + noise) / B, computed
independently by DPGradients(method="loop") with the same seed (opacus#820 reports LoRA updates silently corrupted
with some Opacus + peft versions); the same for the SMP-LoRA per-sample objective; and the repo's example script
with --privacy dpsgd (header, epsilon with its sampling note, trackers, checkpoints, an exact resume, a resume with
another sigma refused) and with SMP-LoRA + DP noise.
"""

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("opacus")

from smplora_plugin.dp import DPError, DPGradients, smp_sample_loss  # noqa: E402
from smplora_plugin.errors import ConfigError, FeatureError  # noqa: E402
from smplora_plugin.integrations.diffusers import (  # noqa: E402
    DP_STATE_FILENAME,
    HoldoutImages,
    PrivacyRegularizer,
    add_privacy_args,
    dp_options_from_args,
    privacy_config_from_args,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "diffusers" / "train_text_to_image_lora.py"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def parse(*argv):
    """A script's parser (the official scripts' names) with the shim's options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--mixed_precision", default=None)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true")
    add_privacy_args(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------- options
def test_options_map_to_dp_options():
    opts = dp_options_from_args(parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "0.7", "--seed", "4"))
    assert (opts.noise_multiplier, opts.max_grad_norm, opts.target_epsilon, opts.delta, opts.accountant,
            opts.seed) == (0.7, 1.0, None, None, "rdp", 4)
    opts = dp_options_from_args(parse("--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_target_epsilon",
                                      "8", "--privacy_max_grad_norm", "0.05", "--privacy_dp_delta", "1e-5",
                                      "--privacy_dp_accountant", "PRV", "--privacy_seed", "9"))
    assert (opts.noise_multiplier, opts.target_epsilon, opts.max_grad_norm, opts.delta, opts.accountant,
            opts.seed) == (None, 8.0, 0.05, 1e-5, "prv", 9)
    # --privacy_delta keeps its meaning: SMP-LoRA's denominator constant, not the DP delta
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_delta", "0.5",
                 "--privacy_noise_multiplier", "1")
    assert privacy_config_from_args(args).delta == 0.5 and dp_options_from_args(args).delta is None
    assert dp_options_from_args(parse()) is None
    assert dp_options_from_args(parse("--privacy", "smplora", "--privacy_holdout_dir", "x")) is None
    # DP-SGD alone: a delegate without a core regulariser and without a holdout
    reg = PrivacyRegularizer.from_args(parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "1"))
    assert reg.core is None and reg.config is None and reg.dp_options.noise_multiplier == 1.0
    assert HoldoutImages.from_args(parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "1")) is None
    # tensorboard's hparams take scalars only
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in vars(args).values())
    with pytest.raises(SystemExit):
        parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--privacy_dp_accountant", "gdp")


@pytest.mark.parametrize("argv, match", [
    (["--privacy", "dpsgd"], "needs a noise level"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "0"], "noise_multiplier=0.0 must be a finite number > 0"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "-1"], "noise_multiplier=-1.0"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--privacy_max_grad_norm", "0"],
     "max_grad_norm=0.0 must be a finite number > 0"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--privacy_dp_delta", "1.5"],
     r"--privacy_dp_delta=1.5 is outside \(0, 1\)"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--privacy_dp_delta", "0"], r"outside \(0, 1\)"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--privacy_target_epsilon", "8"], "not both"),
    (["--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_max_grad_norm", "1"],
     "without a DP mechanism"),
    (["--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_dp_delta", "1e-5"], "without a DP mechanism"),
    (["--privacy_noise_multiplier", "1"], "need a privacy method: --privacy dpsgd"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--mixed_precision", "fp16"], "bf16"),
    (["--privacy", "smplora", "--privacy_holdout_dir", "x", "--privacy_noise_multiplier", "1", "--snr_gamma", "5"],
     "--snr_gamma with --privacy smplora and DP noise"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--with_prior_preservation"], "prior_preservation"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--train_text_encoder"], "train_text_encoder"),
    (["--privacy", "mplora", "--privacy_holdout_dir", "x", "--privacy_noise_multiplier", "1",
      "--privacy_fraction", "0.5"], "does not apply under DP noise"),
])
def test_bad_dp_options_are_refused_by_every_entry_point(argv, match):
    args = parse(*argv)
    for build in (dp_options_from_args, privacy_config_from_args, PrivacyRegularizer.from_args,
                  HoldoutImages.from_args):
        with pytest.raises(DPError, match=match):
            build(args)


def test_what_dp_sgd_alone_keeps_and_an_unknown_method():
    # DP-SGD alone trains the script's loss as it is: min-SNR weighting and bf16 are fine
    assert dp_options_from_args(parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--snr_gamma", "5",
                                      "--mixed_precision", "bf16")) is not None
    with pytest.raises(ConfigError, match=r"choose one of none, smplora, smp, mplora, mp .*or dpsgd"):
        privacy_config_from_args(argparse.Namespace(privacy="dp-sgd"))


# ------------------------------------------------------------------------------------------- the tiny UNet
def _lora_unet(use_dora=False):
    """The tiny SD UNet with a peft LoRA whose B matrices are non-zero (so every LoRA weight has a gradient)."""
    from peft import LoraConfig

    from smplora_plugin.tiny_sd import TinySDConfig, build_components

    unet = build_components(TinySDConfig())["unet"]
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TARGETS,
                                use_dora=use_dora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def _inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10, 300, 600, 900][:n]),
            torch.randn(n, 5, 32, generator=g), torch.randn(n, 4, 8, 8, generator=g))


def _loss_fn(model, x, t, c, y):
    return F.mse_loss(model(x, t, c, return_dict=False)[0].float(), y.float())


def _shim_step(unet, args, x, t, c, y, accumulation):
    """One optimiser step of a diffusers script (accelerate, micro-batches of --train_batch_size) with the block's
    calls, SGD lr=1; returns the delegate."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loader = torch.utils.data.DataLoader(list(range(len(x))), batch_size=args.train_batch_size)
    model, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    reg.attach(accelerator, None, model=model, optimizer=optimizer, train_dataloader=loader)
    for idx in loader:
        with accelerator.accumulate(model):
            pred = model(x[idx], t[idx], c[idx], return_dict=False)[0]
            n = reg.privacy_rows(len(idx))
            loss = F.mse_loss(pred.float(), y[idx].float(), reduction="mean")
            shown = loss.detach().clone()
            loss = reg.step(loss, reg.features(pred, y[idx], rows=n), reg.nonmember_features(None, rows=n),
                            update_attacker=accelerator.sync_gradients)
            assert torch.equal(loss.detach(), shown)          # the script's loss value is kept
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1e-3)    # the script's own clip: on the discarded gradient
            optimizer.step()
            optimizer.zero_grad()
    return reg


def _moved_by(before, after, expected_grad):
    """Each LoRA weight moved by exactly -expected_grad (SGD, lr=1), and every one of them moved."""
    assert len(before) == len(after) == len(expected_grad) > 0
    for (name, b), a, g in zip(before, after, expected_grad):
        assert bool((a - b != 0).all()), f"{name}: some LoRA weights did not move"
        torch.testing.assert_close(a - b, -g, rtol=2e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_one_step_moves_every_lora_weight_by_the_clipped_noised_update(fresh_accelerate):
    """opacus#820: with some Opacus + peft versions LoRA updates were silently wrong. Here the shim's step (per-sample
    gradients by hooks on peft's lora_A / lora_B, accumulation 2 under accelerate) against DPGradients' loop (a
    forward and backward per sample) on a copy of the model, with the same seed."""
    x, t, c, y = _inputs()
    unet = _lora_unet()
    ref = copy.deepcopy(unet)
    before = [(n, p.detach().clone()) for n, p in unet.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n, _ in before)
    args = parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "0.8", "--privacy_max_grad_norm", "0.01",
                 "--seed", "3", "--train_batch_size", "2", "--max_train_steps", "1")
    reg = _shim_step(unet, args, x, t, c, y, accumulation=2)
    after = [p.detach() for p in unet.parameters() if p.requires_grad]

    dp = DPGradients(ref, noise_multiplier=0.8, max_grad_norm=0.01, dataset_size=4, expected_batch_size=4,
                     sampling="fixed_batch", generator=torch.Generator().manual_seed(3), method="loop")
    norms = dp.accumulate(_loss_fn, x, t, c, y)
    assert bool((norms > 0.01).all())                         # every sample was clipped
    dp.step()
    _moved_by(before, after, [p.grad for p in ref.parameters() if p.requires_grad])
    assert reg.dp.dp.steps == 1 and reg.dp.dp.expected_batch_size == 4 and reg.dp.dp.dataset_size == 4
    torch.testing.assert_close(reg.dp.last_norms, norms[2:], rtol=1e-4, atol=0)   # the last micro-batch's norms
    logged = reg.log_dict()
    assert logged["smplora/dp_steps"] == 1.0 and logged["smplora/epsilon"] == pytest.approx(reg.dp.epsilon())
    assert set(reg.progress_postfix()) == {"eps"}


def test_smp_lora_with_dp_noise_clips_each_samples_own_ratio(fresh_accelerate):
    """SMP-LoRA + DP noise: each sample's gradient is that of l_i / (beta + alpha CE_i + delta) with the frozen
    attacker; the shim's step equals DPGradients' loop on smp_sample_loss with an attacker built from the same seed."""
    from smplora_plugin import PrivacyConfig
    from smplora_plugin import PrivacyRegularizer as CoreRegularizer

    x, t, c, y = _inputs()
    unet = _lora_unet()
    ref = copy.deepcopy(unet)
    before = [(n, p.detach().clone()) for n, p in unet.named_parameters() if p.requires_grad]
    args = parse("--privacy", "smplora", "--privacy_holdout_dir", "unused", "--privacy_k_steps", "0",
                 "--privacy_alpha", "2", "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8",
                 "--privacy_noise_multiplier", "0.5", "--privacy_max_grad_norm", "0.01", "--seed", "5",
                 "--train_batch_size", "4", "--max_train_steps", "1")
    reg = _shim_step(unet, args, x, t, c, y, accumulation=1)
    after = [p.detach() for p in unet.parameters() if p.requires_grad]
    assert reg.privacy_rows(4) == 4 and reg.core.global_step == 1

    core = CoreRegularizer(PrivacyConfig(alpha=2.0, k_steps=0, feature_grid=4, hidden=(8,), seed=5, device="cpu"))
    with torch.no_grad():
        core.scores(core.features(ref(x, t, c, return_dict=False)[0], y))      # builds the attacker (seed 5)
    for k, v in core.attacker.state_dict().items():
        assert torch.equal(v, reg.core.attacker.state_dict()[k]), k

    def smp_loss(model, x, t, c, y):
        pred = model(x, t, c, return_dict=False)[0]
        return smp_sample_loss(core, F.mse_loss(pred.float(), y.float()), core.features(pred, y))

    dp = DPGradients(ref, noise_multiplier=0.5, max_grad_norm=0.01, dataset_size=4, expected_batch_size=4,
                     sampling="fixed_batch", generator=torch.Generator().manual_seed(5), method="loop",
                     regularizer=core)
    assert bool((dp.accumulate(smp_loss, x, t, c, y) > 0.01).all())
    dp.step()
    _moved_by(before, after, [p.grad for p in ref.parameters() if p.requires_grad])
    assert json.loads(reg.file_metadata()["smplora.dp"])["objective"] == "smp-lora + dp noise"


def test_smp_with_dp_refuses_a_weighted_loss_and_features_of_another_forward(fresh_accelerate):
    from accelerate import Accelerator

    x, t, c, y = _inputs()
    unet = _lora_unet()
    accelerator = Accelerator(cpu=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=4)
    model, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    args = parse("--privacy", "mplora", "--privacy_holdout_dir", "unused", "--privacy_k_steps", "0",
                 "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8", "--privacy_noise_multiplier", "1",
                 "--train_batch_size", "4", "--max_train_steps", "1")
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    with pytest.raises(DPError, match="not attached"):
        reg.step(torch.tensor(1.0), None)
    reg.attach(accelerator, None, model=model, optimizer=optimizer, train_dataloader=loader)
    pred = model(x, t, c, return_dict=False)[0]
    with pytest.raises(FeatureError, match="the whole batch"):
        reg.features(pred, y, rows=2)
    feats = reg.features(pred, y, rows=4)
    weighted = (F.mse_loss(pred, y, reduction="none").mean(dim=(1, 2, 3)) * torch.arange(1.0, 5.0)).mean()
    with pytest.raises(FeatureError, match="plain mean MSE"):
        reg.step(weighted, feats)
    assert reg.core.global_step == 0 and reg.dp.dp.pending == 0      # refused before any state changed
    with pytest.raises(FeatureError, match="carries each sample's loss"):
        reg.step(F.mse_loss(pred, y), feats.clone())
    with pytest.raises(DPError, match="prior preservation"):
        reg.privacy_rows(4, with_prior_preservation=True)


def _hooks_registered(model, optimizer):
    from smplora_plugin.dp.training import innermost_optimizer

    forward = sum(len(m._forward_hooks) for m in model.modules())
    return forward, len(innermost_optimizer(optimizer)._optimizer_step_pre_hooks)


@pytest.mark.parametrize("case", ["unreachable target", "dora", "fp16 accelerator", "no model", "foreign parameter"])
def test_attach_refuses_before_anything_changes(fresh_accelerate, case):
    from accelerate import Accelerator

    unet = _lora_unet(use_dora=case == "dora")
    params = [p for p in unet.parameters() if p.requires_grad]
    if case == "foreign parameter":
        params.append(torch.nn.Parameter(torch.zeros(3)))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(params, lr=1.0)
    loader = torch.utils.data.DataLoader(list(range(400)), batch_size=100)
    model, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    noise = (["--privacy_target_epsilon", "1e-5"] if case == "unreachable target"
             else ["--privacy_noise_multiplier", "1"])
    reg = PrivacyRegularizer.from_args(parse("--privacy", "dpsgd", *noise, "--train_batch_size", "100",
                                             "--max_train_steps", "10000"))
    acc = SimpleNamespace(mixed_precision="fp16", gradient_accumulation_steps=1, num_processes=1,
                          unwrap_model=lambda m: m) if case == "fp16 accelerator" else accelerator
    kwargs = dict(model=model, optimizer=optimizer, train_dataloader=loader)
    if case == "no model":
        kwargs.pop("model")
    match = {"unreachable target": "not reachable", "dora": "plain LoRA", "fp16 accelerator": "bf16",
             "no model": "model=unet", "foreign parameter": "outside the LoRA network"}[case]
    with pytest.raises(DPError, match=match):
        reg.attach(acc, None, **kwargs)
    assert reg.accelerator is None and reg.dp is None
    assert _hooks_registered(unet, optimizer) == (0, 0)
    assert not accelerator._save_model_state_pre_hook and not accelerator._load_model_state_pre_hook


# ------------------------------------------------------------------------------------------- the example script
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SMPLORA_DISABLE_PLUGINS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(root, out, *privacy):
    cmd = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(root / "pipeline"),
           "--train_data_dir", str(root / "train"), "--resolution", "32", "--center_crop",
           "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_train_steps", "4",
           "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
           "--rank", "4", "--output_dir", str(out), *privacy]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


DPSGD = ["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0", "--privacy_max_grad_norm", "0.1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("tiny_dp")
    spec = importlib.util.spec_from_file_location("_make_tiny", SCRIPT.with_name("make_tiny_pipeline.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert make.main(["--out", str(root), "--digits", "16", "--holdout", "16"]) == 0
    return root


@pytest.fixture(scope="module")
def dpsgd_run(tiny):
    proc = _train(tiny, tiny / "dpA", *DPSGD)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _dp_header(path):
    from smplora_plugin import read_privacy_metadata

    meta = read_privacy_metadata(path)
    return meta, json.loads(meta["smplora.dp"])


def test_example_script_with_dpsgd(tiny, dpsgd_run):
    out = tiny / "dpA"
    meta, dp = _dp_header(out / "pytorch_lora_weights.safetensors")
    assert meta["smplora.method"] == "dp-sgd" and "smplora.config" not in meta
    assert (dp["objective"], dp["sigma"], dp["clip"], dp["steps"], dp["dataset_size"], dp["expected_batch_size"],
            dp["sampling"], dp["accountant"]) == ("dp-sgd", 1.0, 0.1, 4, 16, 8.0, "fixed_batch", "rdp")
    assert dp["sample_rate"] == 0.5 and dp["epsilon"] > 0 and "do not satisfy its assumption" in dp["assumption"]
    # the epsilon is printed with its sampling note, the box before training says how it is computed
    closing = [ln for ln in dpsgd_run.stdout.splitlines() if ln.startswith("smplora DP: ")]
    assert len(closing) == 1 and f"epsilon {dp['epsilon']:.4g} at delta" in closing[0]
    assert "fixed-size batches do not satisfy its assumption" in closing[0]
    assert "DP sampling: epsilon as computed by the Poisson accountant" in " ".join(
        ln.strip("| ") for ln in dpsgd_run.stdout.splitlines())
    assert "eps=" in dpsgd_run.stderr and "mia_ce" not in dpsgd_run.stderr
    rows = [json.loads(ln) for ln in (out / "logs" / "logs.jsonl").read_text().splitlines()]
    eps = [r["smplora/epsilon"] for r in rows if "smplora/epsilon" in r]
    assert len(eps) == 4 and eps == sorted(eps) and eps[0] < eps[-1] == pytest.approx(dp["epsilon"])
    assert [r["smplora/dp_steps"] for r in rows if "smplora/dp_steps" in r] == [1.0, 2.0, 3.0, 4.0]
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert DP_STATE_FILENAME in files and "smplora_state.safetensors" not in files
    lora = _load(out / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k or "lora.up" in k) > 0


def test_example_script_resumes_dpsgd_exactly_and_refuses_another_sigma(tiny, dpsgd_run):
    (tiny / "dpB").mkdir()
    shutil.copytree(tiny / "dpA" / "checkpoint-2", tiny / "dpB" / "checkpoint-2")
    b = _train(tiny, tiny / "dpB", *DPSGD, "--resume_from_checkpoint", "latest")
    assert b.returncode == 0, b.stderr[-4000:]
    for rel in ("pytorch_lora_weights.safetensors", f"checkpoint-4/{DP_STATE_FILENAME}"):
        ta, tb = _load(tiny / "dpA" / rel), _load(tiny / "dpB" / rel)
        assert set(ta) == set(tb) and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}:{k} differs after resume"
    assert _dp_header(tiny / "dpB" / "pytorch_lora_weights.safetensors")[1] == \
        _dp_header(tiny / "dpA" / "pytorch_lora_weights.safetensors")[1]        # 4 steps, the same epsilon

    (tiny / "dpC").mkdir()
    shutil.copytree(tiny / "dpA" / "checkpoint-2", tiny / "dpC" / "checkpoint-2")
    snapshot = sorted(str(p.relative_to(tiny / "dpC")) for p in (tiny / "dpC").rglob("*") if p.is_file())
    c = _train(tiny, tiny / "dpC", "--privacy", "dpsgd", "--privacy_noise_multiplier", "2.0",
               "--privacy_max_grad_norm", "0.1", "--resume_from_checkpoint", "latest")
    assert c.returncode != 0
    assert "DPError" in c.stderr and "other DP settings" in c.stderr and "sigma: saved 1.0 vs this 2.0" in c.stderr
    # refused when the shim is attached, before the script writes its trackers' config or loads the checkpoint
    assert "Resuming from checkpoint" not in c.stdout + c.stderr
    assert sorted(str(p.relative_to(tiny / "dpC")) for p in (tiny / "dpC").rglob("*") if p.is_file()) == snapshot


@pytest.mark.parametrize("privacy, match", [
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "0"], "noise_multiplier=0.0"),
    # refused when attached (after accelerator.prepare): a step of 16 x 2 images from 16 (the unreachable target
    # epsilon is refused at the same place, test_attach_refuses_before_anything_changes; Opacus takes a minute for it)
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1", "--train_batch_size", "16"],
     "must be an int of at least the batch (32)"),
])
def test_example_script_refuses_bad_dp_input_before_writing_anything(tiny, tmp_path, privacy, match):
    out = tmp_path / "out"
    proc = _train(tiny, out, *privacy)
    assert proc.returncode != 0 and "DPError" in proc.stderr and match in proc.stderr
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_example_script_with_smp_lora_and_dp_noise(tiny):
    out = tiny / "smpdp"
    proc = _train(tiny, out, "--privacy", "smplora", "--privacy_holdout_dir", str(tiny / "holdout"),
                  "--privacy_feature_grid", "8", "--privacy_attacker_hidden", "32", "16", "--privacy_attacker_lr",
                  "1e-3", "--privacy_noise_multiplier", "1.0", "--privacy_max_grad_norm", "0.1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta, dp = _dp_header(out / "pytorch_lora_weights.safetensors")
    assert meta["smplora.method"] == "smp-lora" and json.loads(meta["smplora.metrics"])["attacker_updates"] == 4
    assert dp["objective"] == "smp-lora + dp noise" and dp["steps"] == 4 and "attacker" in dp["caveat"]
    assert "eps=" in proc.stderr and "mia_ce=" in proc.stderr
    assert "smp-lora + dp noise: epsilon" in proc.stdout and "not a guarantee for the whole run" in proc.stdout
    for step in (2, 4):
        files = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {DP_STATE_FILENAME, "smplora_state.safetensors"} <= files
