"""DP noise in the kohya shim, against the stand-in: ``--privacy dpsgd`` (DP-SGD alone, kohya's own loss) and
``--privacy smplora --privacy_noise_multiplier S`` (SMP-LoRA + DP noise), their options (CLI and TOML), the
refusals before anything is written, the header entry, the progress bar, trackers, checkpoints and resume."""

from __future__ import annotations

import inspect
import json
import math
import sys

import pytest
import torch
from safetensors import safe_open
from test_kohya_standin import _clean_kohya_modules, data, header, kohya_args, launch, parse, standin  # noqa: F401

from smplora_plugin.dp import DPError
from smplora_plugin.errors import ConfigError
from smplora_plugin.integrations.kohya import make_private_trainer, private_trainer_class, settings_from_namespace
from smplora_plugin.integrations.kohya.checkpoints import DP_STATE_DIR_FILE, read_dp_state

pytest.importorskip("opacus")

DPSGD = ["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0", "--privacy_max_grad_norm", "0.5"]
SMP = ["--privacy", "smplora", "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8",
       "--privacy_attacker_lr", "1e-3", "--privacy_alpha", "0.5"]
ROWS = 12          # the stand-in data: 6 training images x 2 repeats


def dp_entry(path) -> dict:
    return json.loads(header(path)["smplora.dp"])


def lora_tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def initial_lora(seed: int = 3, dim: int = 2) -> dict:
    """The stand-in's LoRA before training (it seeds torch with --seed right before building it)."""
    tn = standin()
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in tn.TinyLoRANetwork(dim).state_dict().items()}


def out_files(out) -> list:
    return sorted(str(p) for p in out.rglob("*")) if out.exists() else []


# ---------------------------------------------------------------------------- options
def test_cli_options_parse_into_dp_settings():
    args = parse("--privacy", "dpsgd", "--privacy_noise_multiplier", "0.8", "--privacy_max_grad_norm", "0.1",
                 "--privacy_dp_delta", "1e-4", "--privacy_dp_accountant", "prv", "--privacy_seed", "9")
    s = settings_from_namespace(args)
    assert s.enabled and s.method == "dpsgd" and s.objective is None and s.config is None
    assert (s.dp.noise_multiplier, s.dp.max_grad_norm, s.dp.delta, s.dp.accountant, s.dp.seed) == \
        (0.8, 0.1, 1e-4, "prv", 9)
    s = settings_from_namespace(parse("--privacy", "smplora", "--privacy_target_epsilon", "8", "--seed", "4",
                                      "--privacy_preset", "robust"))
    assert s.method == "smplora" and s.dp.target_epsilon == 8.0 and s.dp.max_grad_norm == 1.0 and s.dp.seed == 4
    assert s.config.privacy_fraction == 1.0 and s.config.calibrated   # robust's 0.25 does not apply under DP
    assert settings_from_namespace(parse("--privacy", "smplora")).dp is None       # SMP-LoRA alone: no noise


def test_toml_section_sets_the_dp_options(tmp_path, monkeypatch):
    toml = tmp_path / "cfg.toml"
    toml.write_text('[smplora]\nprivacy = "dpsgd"\nprivacy_noise_multiplier = 2\nprivacy_max_grad_norm = 0.25\n'
                    'privacy_dp_accountant = "rdp"\nprivacy_seed = 5\n')
    tn = standin()
    from library import train_util

    from smplora_plugin.integrations.kohya import add_privacy_arguments

    parser = add_privacy_arguments(tn.setup_parser())
    argv = ["--config_file", str(toml), "--privacy_max_grad_norm", "0.5"]   # the command line wins over the TOML
    monkeypatch.setattr(sys, "argv", ["train_network.py", *argv])
    args = train_util.read_config_from_file(parser.parse_args(argv), parser)
    s = settings_from_namespace(args)
    assert (s.method, s.dp.noise_multiplier, s.dp.max_grad_norm, s.dp.seed) == ("dpsgd", 2.0, 0.5, 5)
    toml.write_text('[smplora]\nprivacy = "dpsgd"\nprivacy_noise_multiplier = "lots"\n')   # TOML skips argparse
    monkeypatch.setattr(sys, "argv", ["train_network.py", "--config_file", str(toml)])
    args = train_util.read_config_from_file(parser.parse_args(["--config_file", str(toml)]), parser)
    with pytest.raises(DPError, match="privacy_noise_multiplier='lots' must be a finite number"):
        settings_from_namespace(args)


def test_in_process_mapping_takes_the_dp_options():
    from smplora_plugin.integrations.kohya.options import settings_from_mapping

    s = settings_from_mapping({"privacy": "dpsgd", "privacy_noise_multiplier": 1.5, "privacy_seed": 2})
    assert s.method == "dpsgd" and s.dp.noise_multiplier == 1.5 and s.dp.seed == 2 and s.config is None
    s = settings_from_mapping({"alpha": 0.2, "seed": 7, "privacy_noise_multiplier": 1.0})
    assert s.method == "smplora" and s.config.alpha == 0.2 and s.dp.seed == 7 == s.seed
    with pytest.raises(DPError, match="fraction does not apply"):
        settings_from_mapping({"privacy": "smplora", "privacy_noise_multiplier": 1.0, "privacy_fraction": 0.5})
    with pytest.raises(ConfigError, match="does not train"):
        settings_from_mapping({"privacy": "dpsgd", "privacy_noise_multiplier": 1.0, "alpha": 0.2})


# ---------------------------------------------------------------------------- refusals, before anything is written
BAD = {
    "sigma<=0": ([*DPSGD[:2], "--privacy_noise_multiplier", "0"], "", "--privacy_noise_multiplier=0.0 must be"),
    "sigma<0": (["--privacy", "smplora", "--privacy_noise_multiplier", "-1"], "holdout",
                "--privacy_noise_multiplier=-1.0 must be"),
    "clip<=0": ([*DPSGD[:4], "--privacy_max_grad_norm", "0"], "", "--privacy_max_grad_norm=0.0 must be"),
    "no noise": (["--privacy", "dpsgd"], "", "needs a noise level"),
    "dp without mechanism": (["--privacy", "smplora", "--privacy_max_grad_norm", "1.0"], "holdout",
                             "without a DP mechanism"),
    "dp with privacy none": (["--privacy", "none", "--privacy_noise_multiplier", "1.0"], "",
                             "given with --privacy none"),
    "delta outside (0,1)": ([*DPSGD, "--privacy_dp_delta", "1.5"], "", "outside \\(0, 1\\)"),
    "accountant": ([*DPSGD, "--privacy_dp_accountant", "gdp"], "", "is not 'rdp'"),
    "sigma and target": ([*DPSGD, "--privacy_target_epsilon", "8"], "", "not both"),
    "unreachable target": (["--privacy", "dpsgd", "--privacy_target_epsilon", "1e-6", "--privacy_dp_delta", "1e-8"],
                           "", "not reachable in 2 steps"),   # checked at the first step, before any file
    "smp option with dpsgd": ([*DPSGD, "--privacy_alpha", "0.5"], "", "does not train"),
    "fraction under DP": ([*SMP, "--privacy_noise_multiplier", "1.0", "--privacy_fraction", "0.5"], "holdout",
                          "fraction does not apply"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dp_input_is_refused_before_anything_is_written(data, tmp_path, case, capsys):  # noqa: F811
    argv, holdout, message = BAD[case]
    extra = ["--privacy_holdout_dir", str(data / "holdout")] if holdout else []
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), *argv, *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert __import__("re").search(message, err), err
    assert out_files(out) == []


@pytest.mark.parametrize("toml, message", [
    ('mixed_precision = "fp16"\n', "fp16 mixed precision is not supported"),
    ('min_snr_gamma = 5.0\n', "cannot reproduce --min_snr_gamma 5.0"),
    ('loss_type = "huber"\n', "--loss_type 'huber'"),
    ('masked_loss = true\n', "--masked_loss True"),
    ('debiased_estimation_loss = true\nv_pred_like_loss = 0.1\n', "--v_pred_like_loss 0.1"),
])
def test_fp16_and_loss_options_smp_dp_cannot_reproduce_are_refused(data, tmp_path, toml, message, capsys):  # noqa: F811
    """sd-scripts' own options (the stand-in has no such flags: a TOML value reaches kohya's namespace as theirs do);
    fp16 for any DP run, the loss options only under SMP-LoRA + DP noise (DP-SGD alone uses kohya's loss)."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(toml)
    out = tmp_path / "out"
    rc = launch("train_network.py", "--config_file", str(cfg), *kohya_args(data, out, "--max_train_steps", "2"),
                *SMP, "--privacy_noise_multiplier", "1.0", "--privacy_holdout_dir", str(data / "holdout"))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert out_files(out) == []
    if "fp16" not in toml and "loss_type" not in toml and "masked" not in toml:   # dpsgd: kohya's loss, accepted
        assert launch("train_network.py", "--config_file", str(cfg),
                      *kohya_args(data, tmp_path / "dp", "--max_train_steps", "1"), *DPSGD) == 0


def test_a_trainer_loss_the_per_sample_losses_do_not_reproduce_is_refused(data, tmp_path):  # noqa: F811
    """The safety net of SMP-LoRA + DP noise: a trainer whose post_process_loss weights the images its own way."""
    tn = standin()

    class Weighted(tn.NetworkTrainer):
        def post_process_loss(self, loss, args, timesteps, noise_scheduler):
            return loss * (1.0 + timesteps.float() / 1000.0)

    trainer = make_private_trainer(Weighted)
    with pytest.raises(DPError, match="not the mean of its images' l2 losses"):
        trainer.train(parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "2"), *SMP,
                            "--privacy_noise_multiplier", "1.0", "--privacy_holdout_dir", str(data / "holdout")))
    dp_only = make_private_trainer(Weighted)      # DP-SGD alone trains on that loss as it is
    dp_only.train(parse(*kohya_args(data, tmp_path / "dp", "--max_train_steps", "2"), *DPSGD))
    assert dp_only.privacy_dp.dp.steps == 2


# ---------------------------------------------------------------------------- DP-SGD alone
def test_dpsgd_run_trains_the_lora_and_reports_epsilon(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "4", "--save_every_n_steps", "2",
                                                "--progress"), *DPSGD)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    meta = header(out / "lora.safetensors")
    assert meta["smplora.method"] == "dp-sgd" and "smplora.config" not in meta and "smplora.metrics" not in meta
    entry = dp_entry(out / "lora.safetensors")
    assert entry["objective"] == "dp-sgd" and entry["steps"] == 4 and entry["sigma"] == 1.0 and entry["clip"] == 0.5
    assert entry["sampling"] == "fixed_batch" and entry["dataset_size"] == ROWS and entry["expected_batch_size"] == 2
    assert entry["sample_rate"] == pytest.approx(2 / ROWS) and "fixed-size" in entry["assumption"]
    assert math.isfinite(entry["epsilon"]) and entry["epsilon"] > 0
    assert entry["delta"] == pytest.approx(1 / (ROWS * math.log(ROWS)))
    assert dp_entry(out / "lora-step00000002.safetensors")["steps"] == 2      # each checkpoint: its own steps
    assert dp_entry(out / "lora-step00000002.safetensors")["epsilon"] < entry["epsilon"]
    trained, before = lora_tensors(out / "lora.safetensors"), initial_lora()
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in trained)
    assert (out / "lora-step00000002.smplora_dp").is_file() and (out / "lora.smplora_dp").is_file()
    assert not list(out.glob("*.smplora_state"))                              # no attacker
    assert "eps=" in captured.err and "avr_loss=" in captured.err and "mia_ce" not in captured.err
    text = " ".join(captured.out.split())
    assert "DP-SGD" in text and "sigma 1, per-sample clip 0.5, batch 2 of 12" in text
    assert "fixed-size" in text and "DP noise after training: dp-sgd: epsilon" in text
    # no holdout given: none needed; the manifest still lists the training images
    from smplora_plugin.holdout import read_manifest

    sets = read_manifest(out / "lora_smplora_manifest.json")
    assert len(sets["member"]) == 6 and sets["nonmember"] == []


def grad_spy(tn):
    """A private stand-in trainer recording, at each optimiser step, kohya's own gradient (before the DP step
    pre-hook), the gradient the optimiser steps on (after it), the smallest per-image gradient norm and the
    images of the step."""

    class Spy(private_trainer_class(tn.NetworkTrainer)):
        seen: list

        def on_step_start(self, args, accelerator, *rest, **kw):
            if self.privacy_dp is None and kw.get("is_train", True):
                self.seen = []
                inner = accelerator._optimizers[0].optimizer
                params = [p for g in inner.param_groups for p in g["params"]]
                kohya = {}

                def before(optimizer, a, k):       # registered before the shim's: runs first
                    kohya["grads"] = [p.grad.detach().clone() for p in params]

                def after(optimizer, a, k):
                    self.seen.append((kohya["grads"], [p.grad.detach().clone() for p in params],
                                      float(self.privacy_dp.last_norms.min()), kohya.pop("rows")))

                inner.register_step_pre_hook(before)
                inner.register_step_post_hook(after)
            out = super().on_step_start(args, accelerator, *rest, **kw)
            if self.privacy_dp is not None and not hasattr(self, "_counting"):
                self._counting = True
                dp = self.privacy_dp.dp
                add = dp.add_per_sample

                def counted(grads):
                    kohya["rows"] = kohya.get("rows", 0) + int(grads[0].shape[0])
                    return add(grads)

                dp.add_per_sample = counted
            return out

    return Spy()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.float().reshape(-1) for g in grads])


def test_dpsgd_replaces_kohyas_gradient_by_the_clipped_noised_one(data, tmp_path):  # noqa: F811
    """At each optimiser step the gradient is (sum of clipped per-image gradients + noise) / B: with a tiny clip and
    tiny noise its norm is at most about the clip, while kohya's own gradient and per-image gradients are far
    larger; the trackers get smplora/epsilon."""
    tn = standin()
    trainer = grad_spy(tn)
    trainer.train(parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "3"), "--privacy", "dpsgd",
                        "--privacy_noise_multiplier", "1e-3", "--privacy_max_grad_norm", "1e-3"))
    assert len(trainer.seen) == 3
    for kohya, dp, smallest_sample_norm, _ in trainer.seen:
        assert flat(dp).norm() <= 1e-3 * 1.5                  # (2 clipped gradients + small noise) / 2
        assert smallest_sample_norm > 100 * 1e-3              # kohya's per-image gradients: far above the clip
        assert flat(kohya).norm() > 10 * flat(dp).norm()      # kohya's own gradient was discarded
    assert [logs["smplora/dp_steps"] for logs in trainer.step_logs] == [1.0, 2.0, 3.0]
    assert all(logs["smplora/epsilon"] > 0 for logs in trainer.step_logs)
    assert "smplora/attacker_ce_member" not in trainer.step_logs[-1]


@pytest.mark.parametrize("privacy, accumulation", [("dpsgd", 2), ("smplora", 1)])
def test_per_image_gradients_sum_to_kohyas_batch_gradient(data, tmp_path, privacy, accumulation):  # noqa: F811
    """Without clipping (a huge clip) and with almost no noise the DP gradient is the sum of the per-image
    gradients over the expected batch B, so B / (the step's images) times it must be kohya's own batch gradient of
    the loss it backpropagates: for DP-SGD kohya's loss (under gradient accumulation: full steps of 2 x 3 images),
    for SMP-LoRA + DP noise the mean of the images' own terms, regularisation images among them (their own
    subset's batches: short ones, and one holding only regularisation images)."""
    tn = standin()
    trainer = grad_spy(tn)
    extra = ["--reg_data_dir", str(data / "reg"), "--privacy_holdout_dir", str(data / "holdout"), *SMP[2:]] \
        if privacy == "smplora" else []
    trainer.train(parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "4", "--train_batch_size", "3",
                                    "--gradient_accumulation_steps", str(accumulation)),
                        "--privacy", privacy, "--privacy_noise_multiplier", "1e-9", "--privacy_max_grad_norm", "1e3",
                        *extra))
    assert len(trainer.seen) == 4
    batch = 3 * accumulation
    for kohya, dp, _, rows in trainer.seen:     # the noise: sigma C = 1e-6 per coordinate, / B
        torch.testing.assert_close(flat(dp) * batch / rows, flat(kohya), rtol=1e-4, atol=1e-6)
    assert max(float(n) for n in trainer.privacy_dp.last_norms) < 1e3     # nothing was clipped
    if privacy == "smplora":
        assert any(rows < batch for *_, rows in trainer.seen) and any(rows == batch for *_, rows in trainer.seen)
    else:
        assert all(rows == batch for *_, rows in trainer.seen)


def test_a_network_whose_lora_layers_the_hooks_never_see_is_stopped(data, tmp_path):  # noqa: F811
    """A LoRA applied by merging its weights (not by calling lora_down / lora_up) gives the hooks nothing: the run
    stops at the second step instead of training on noise."""
    import torch.nn.functional as F

    from smplora_plugin.errors import SmploraError

    tn = standin()

    class Merged(tn.NetworkTrainer):
        def _denoise(self, unet, noisy_latents, timesteps):
            net = self._network.module if hasattr(self._network, "module") else self._network
            weight = net.lora_up.weight.flatten(1) @ net.lora_down.weight.flatten(1)
            return unet(noisy_latents, timesteps) + F.conv2d(noisy_latents, weight[:, :, None, None]) * net.multiplier

    trainer = make_private_trainer(Merged)
    with pytest.raises(SmploraError, match="held no per-sample gradient"):
        trainer.train(parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "3"), *DPSGD))
    assert trainer.privacy_dp.dp.steps == 1


def test_dpsgd_with_gradient_checkpointing_equals_without(data, tmp_path):  # noqa: F811
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        rc = launch("train_network.py", *kohya_args(data, tmp_path / name, "--max_train_steps", "3", *extra), *DPSGD)
        assert rc == 0
        runs[name] = lora_tensors(tmp_path / name / "lora.safetensors")
    for key in runs["plain"]:
        torch.testing.assert_close(runs["ckpt"][key], runs["plain"][key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(runs["plain"][k], v) for k, v in initial_lora().items())


def test_gradient_accumulation_counts_the_whole_step(data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "2",
                                                  "--gradient_accumulation_steps", "2"), *DPSGD) == 0
    entry = dp_entry(out / "lora.safetensors")
    assert entry["steps"] == 2 and entry["expected_batch_size"] == 4 and entry["sample_rate"] == pytest.approx(4 / 12)


def test_checkpoint_and_resume_continue_the_accountant_exactly(data, tmp_path, capsys):  # noqa: F811
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert launch("train_network.py", *kohya_args(data, whole, "--max_train_steps", "4", "--save_every_n_steps", "2",
                                                  "--save_state"), *DPSGD) == 0
    state_dir = whole / "lora-step00000002-state"
    saved = read_dp_state(state_dir / DP_STATE_DIR_FILE)
    assert json.loads(saved["dp.meta"])["steps"] == 2
    capsys.readouterr()
    # the same settings, 2 more steps from the step-2 state: the accountant continues at 2
    assert launch("train_network.py", *kohya_args(data, part, "--max_train_steps", "2", "--resume", str(state_dir)),
                  *DPSGD) == 0
    assert "continued from a DP state of 2 steps" in " ".join(capsys.readouterr().out.split())
    a, b = dp_entry(whole / "lora.safetensors"), dp_entry(part / "lora.safetensors")
    assert a["steps"] == b["steps"] == 4 and a["epsilon"] == b["epsilon"]
    # the noise generator continued too: after 4 steps both runs hold the same generator state
    assert torch.equal(read_dp_state(whole / "lora.smplora_dp")["dp.rng"], read_dp_state(part / "lora.smplora_dp")[
        "dp.rng"])
    assert (whole / "lora-state" / DP_STATE_DIR_FILE).is_file()


@pytest.mark.parametrize("argv, message", [
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "2.0", "--privacy_max_grad_norm", "0.5"],
     "--privacy_noise_multiplier 1.0 (this run: --privacy_noise_multiplier 2.0)"),
    (["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0"],
     "--privacy_max_grad_norm 0.5 (this run: --privacy_max_grad_norm 1.0)"),
    (["--privacy", "dpsgd", "--privacy_target_epsilon", "50"], "--privacy_noise_multiplier 1.0"),
])
def test_resume_with_other_dp_settings_is_refused_before_training(data, tmp_path, argv, message, capsys):  # noqa: F811
    first = tmp_path / "first"
    assert launch("train_network.py", *kohya_args(data, first, "--max_train_steps", "2", "--save_state"),
                  *DPSGD) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--resume", str(first / "lora-state")), *argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert out_files(out) == []


def test_a_dp_resume_from_a_state_without_dp_is_refused(data, tmp_path, capsys):  # noqa: F811
    first = tmp_path / "first"
    assert launch("train_network.py", *kohya_args(data, first, "--max_train_steps", "2", "--save_state"),
                  "--privacy", "none") == 0
    capsys.readouterr()
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--resume", str(first / "lora-state")), *DPSGD)
    err = capsys.readouterr().err
    assert rc == 2 and f"holds no {DP_STATE_DIR_FILE}" in err and out_files(out) == []


def test_a_resumed_state_with_another_batch_is_refused_at_the_first_step(data, tmp_path, capsys):  # noqa: F811
    """What is known only once kohya counted its data (the batch, the rows) is checked when the state is loaded,
    still before the manifest, a LoRA or a state file is written."""
    first = tmp_path / "first"
    assert launch("train_network.py", *kohya_args(data, first, "--max_train_steps", "2", "--save_state"),
                  *DPSGD) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--resume", str(first / "lora-state"),
                                                "--gradient_accumulation_steps", "2"), *DPSGD)
    err = capsys.readouterr().err
    assert rc == 2 and "other DP settings" in err and "expected_batch_size" in err, err
    assert out_files(out) == []


def test_dpsgd_with_a_holdout_still_checks_it_and_restores_the_header(data, tmp_path, capsys):  # noqa: F811
    import shutil

    bad = tmp_path / "bad_holdout" / "1_thing"
    bad.mkdir(parents=True)
    shutil.copy(data / "train" / "2_thing" / "img_01.png", bad / "dup.png")
    rc = launch("train_network.py", *kohya_args(data, tmp_path / "bad"), *DPSGD,
                "--privacy_holdout_dir", str(bad.parent))
    assert rc == 2 and "byte-identical" in capsys.readouterr().err
    plain, priv = tmp_path / "plain", tmp_path / "priv"
    assert launch("train_network.py", *kohya_args(data, plain, "--max_train_steps", "2"), "--privacy", "none") == 0
    assert launch("train_network.py", *kohya_args(data, priv, "--max_train_steps", "2"), *DPSGD,
                  "--privacy_holdout_dir", str(data / "holdout")) == 0
    volatile = {"ss_session_id", "ss_training_started_at", "sshs_model_hash"}
    a, b = header(plain / "lora.safetensors"), header(priv / "lora.safetensors")
    assert {k: v for k, v in b.items() if not k.startswith("smplora.") and k not in volatile} == \
        {k: v for k, v in a.items() if k not in volatile}
    assert json.loads(b["smplora.data"])["counts"] == {"member": 6, "nonmember": 4}


# ---------------------------------------------------------------------------- SMP-LoRA + DP noise
@pytest.mark.parametrize("preset", ["paper", "robust"])
def test_smp_with_dp_noise_trains_each_images_term(data, tmp_path, preset, capsys, monkeypatch):  # noqa: F811
    from smplora_plugin.integrations.kohya import dp_noise

    kohya_losses, returned = [], []
    original = dp_noise.sample_losses

    def recording(trainer, pred, target, weighting, batch, loss):
        kohya_losses.append(float(loss))
        return original(trainer, pred, target, weighting, batch, loss)

    monkeypatch.setattr(dp_noise, "sample_losses", recording)
    tn = standin()

    class Spy(private_trainer_class(tn.NetworkTrainer)):
        def process_batch(self, *a, **kw):
            out = super().process_batch(*a, **kw)
            if inspect.signature(tn.NetworkTrainer.process_batch).bind(self, *a, **kw).arguments.get("is_train", True):
                returned.append(float(out))     # training batches only (not the held-out forwards)
            return out

    trainer = Spy()
    out = tmp_path / "out"
    trainer.train(parse(*kohya_args(data, out, "--max_train_steps", "4", "--reg_data_dir", str(data / "reg"),
                                    "--save_state"), *SMP, "--privacy_preset", preset,
                        "--privacy_noise_multiplier", "1.0", "--privacy_holdout_dir", str(data / "holdout")))
    reg, dpt = trainer.privacy_regularizer, trainer.privacy_dp
    assert dpt.dp.steps == 4 and reg.attacker_updates >= 1 and reg.config.privacy_fraction == 1.0
    assert reg.config.calibrated == (preset == "robust")
    meta = header(out / "lora.safetensors")
    entry = json.loads(meta["smplora.dp"])
    assert meta["smplora.method"] == "smp-lora" and entry["objective"] == "smp-lora + dp noise"
    assert "attacker is trained on member features" in entry["caveat"] and entry["steps"] == 4
    assert json.loads(meta["smplora.config"])["privacy_fraction"] == 1.0
    # kohya's loss keeps its value (avr_loss); its gradient is that of the per-image terms
    assert len(kohya_losses) == len(returned) == 4 and returned == pytest.approx(kohya_losses, rel=1e-6)
    logs = trainer.step_logs[-1]
    assert {"smplora/epsilon", "smplora/attacker_ce_member", "smplora/dp_steps"} <= set(logs)
    assert (out / "lora-state" / DP_STATE_DIR_FILE).is_file()
    assert (out / "lora-state" / "smplora_state.safetensors").is_file()
    assert (out / "lora.smplora_dp").is_file() and (out / "lora.smplora_state").is_file()
    text = " ".join(capsys.readouterr().out.split())
    assert "SMP-LoRA + DP noise" in text and "with DP noise" in text


@pytest.mark.slow
@pytest.mark.parametrize("privacy", [DPSGD, [*SMP, "--privacy_noise_multiplier", "1.0"]], ids=["dpsgd", "smp+dp"])
def test_two_process_accelerate_launch_sums_the_clipped_gradients_over_ranks(data, tmp_path, privacy):  # noqa: F811
    """torchrun with 2 CPU processes (accelerate's MULTI_CPU, gloo; ``accelerate launch --cpu`` would start one):
    the DP batch is the global one (micro-batch x ranks), every rank steps its accountant alike (the same
    --privacy_seed), and SMP-LoRA + DP noise keeps the ranks in step on batches where one rank holds only
    regularisation images."""
    import os
    import socket
    import subprocess

    from test_kohya_standin import STANDIN, make_folder

    make_folder(data / "reg", "1_class", 3, 2, "reg")
    out = tmp_path / "out"
    env = {**os.environ, "SD_SCRIPTS_DIR": str(STANDIN), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0",
           "--rdzv_backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "smplora_plugin.integrations.kohya",
           "train_network.py", *kohya_args(data, out, "--reg_data_dir", str(data / "reg"), "--max_train_steps", "4",
                                           "--train_batch_size", "1", "--save_state"),
           *privacy, "--privacy_holdout_dir", str(data / "holdout")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("DP noise after training") == 1       # printed by the main process only
    entry = dp_entry(out / "lora.safetensors")
    assert entry["steps"] == 4 and entry["expected_batch_size"] == 2 and entry["dataset_size"] == ROWS
    assert json.loads(read_dp_state(out / "lora-state" / DP_STATE_DIR_FILE)["dp.meta"])["steps"] == 4
