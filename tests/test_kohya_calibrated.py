"""Base-calibrated features in the kohya shim: --privacy_preset / --privacy_calibrated and the
LoRA-off base forward (network.set_multiplier(0.0)) at the same inputs, against the stand-in."""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_kohya_standin import _clean_kohya_modules, data, header, kohya_args, launch, parse, standin  # noqa: F401

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import ConfigError, SmploraError, StateError
from smplora_plugin.integrations.kohya import add_privacy_arguments, settings_from_namespace
from smplora_plugin.integrations.kohya.options import settings_from_mapping

PRIV = ["--privacy", "smplora", "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8"]
ROBUST = PrivacyConfig.preset("robust")


def kohya_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file", type=str, default=None)
    p.add_argument("--seed", type=int, default=None)
    return add_privacy_arguments(p)


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, expected", [
    ([], dict(calibrated=False, alpha=0.05, attacker_lr=1e-5)),
    (["--privacy_preset", "paper"], dict(calibrated=False, alpha=0.05, attacker_lr=1e-5)),
    (["--privacy_preset", "robust"], dict(calibrated=True, alpha=ROBUST.alpha, attacker_lr=ROBUST.attacker_lr)),
    (["--privacy_preset", "ROBUST"], dict(calibrated=True, alpha=ROBUST.alpha)),
    (["--privacy_calibrated"], dict(calibrated=True, alpha=0.05, attacker_lr=1e-5)),
    (["--privacy_preset", "robust", "--no-privacy_calibrated"], dict(calibrated=False, alpha=ROBUST.alpha)),
    (["--privacy_preset", "robust", "--privacy_alpha", "1.5"],
     dict(calibrated=True, alpha=1.5, attacker_lr=ROBUST.attacker_lr)),
    (["--privacy_alpha", "1.5", "--privacy_preset", "robust", "--privacy_attacker_lr", "1e-4"],
     dict(calibrated=True, alpha=1.5, attacker_lr=1e-4)),
])
def test_preset_and_calibrated_flags_with_explicit_options_overriding_the_preset(argv, expected):
    s = settings_from_namespace(kohya_parser().parse_args(["--privacy", "smplora", *argv]))
    for name, value in expected.items():
        assert getattr(s.config, name) == value, name


def test_unknown_preset_on_the_command_line_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        kohya_parser().parse_args(["--privacy_preset", "strong"])
    assert exc.value.code == 2 and "invalid choice: 'strong'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kohya_parser().parse_args(["--privacy_calibrated", "yes"])


@pytest.mark.parametrize("values, message", [
    ({"privacy_preset": "strong"}, "privacy_preset='strong' is unknown: use 'paper'"),
    ({"privacy_preset": 1}, "privacy_preset=1 is unknown"),
    ({"privacy_calibrated": "true"}, "privacy_calibrated='true' must be true or false"),
    ({"privacy_calibrated": 1}, "privacy_calibrated=1 must be true or false"),
    ({"privacy_calibratd": True}, "Did you mean 'privacy_calibrated'"),
])
def test_toml_style_preset_values_are_validated(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings_from_namespace(argparse.Namespace(privacy="smplora", **values))


def test_toml_section_preset_and_command_line_override(tmp_path, monkeypatch):
    """sd-scripts' read_config_from_file: [smplora] values first, the command line on top."""
    tn = standin()
    from library import train_util

    toml = tmp_path / "cfg.toml"
    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_preset = "robust"\nprivacy_alpha = 3.0\n')
    parser = add_privacy_arguments(tn.setup_parser())

    def read(*cli):
        argv = ["--config_file", str(toml), *cli]
        monkeypatch.setattr(sys, "argv", ["train_network.py", *argv])
        return settings_from_namespace(train_util.read_config_from_file(parser.parse_args(argv), parser)).config

    cfg = read()
    assert cfg.calibrated and cfg.alpha == 3.0 and cfg.attacker_lr == ROBUST.attacker_lr
    cfg = read("--no-privacy_calibrated", "--privacy_alpha", "0.5")
    assert not cfg.calibrated and cfg.alpha == 0.5 and cfg.attacker_lr == ROBUST.attacker_lr
    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_calibrated = true\n')
    assert read().calibrated and read().alpha == 0.05
    assert not read("--no-privacy_calibrated").calibrated


def test_preset_in_mappings_and_privacy_none(caplog):
    s = settings_from_mapping({"privacy_preset": "robust", "alpha": 2.0})
    assert s.config.calibrated and s.config.alpha == 2.0 and s.config.attacker_lr == ROBUST.attacker_lr
    assert settings_from_mapping(PrivacyConfig.preset("robust")).config.calibrated
    assert not settings_from_mapping({"privacy_preset": "robust", "privacy_calibrated": False}).config.calibrated
    caplog.set_level(logging.WARNING, logger="smplora.kohya")
    s = settings_from_namespace(argparse.Namespace(privacy="none", privacy_preset="robust"))
    assert not s.enabled and "privacy_preset" in caplog.text and "NO membership-inference defense" in caplog.text


# ---------------------------------------------------------------------------- the base forward
def spy_class(tn, base=None, raise_at_zero=False, start_multiplier=None):
    """A private trainer that records every UNet call and every reg.features call."""
    from smplora_plugin.integrations.kohya import private_trainer_class

    class Spy(private_trainer_class(base or tn.NetworkTrainer)):
        def __init__(self):
            super().__init__()
            self.unet_calls, self.feature_calls, self.batches, self.val_step_ends = [], [], [], 0

        def post_process_network(self, args, accelerator, network, text_encoders, unet):
            if start_multiplier is not None:
                network.set_multiplier(start_multiplier)
            return super().post_process_network(args, accelerator, network, text_encoders, unet)

        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kw):
            m = self._network.multiplier
            if raise_at_zero and m == 0.0:
                raise RuntimeError("base forward failed")
            out = super().call_unet(args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                                    **kw)
            self.unet_calls.append(dict(x=noisy_latents.detach().clone(), t=timesteps.clone(), m=m, unet=unet,
                                        grad=torch.is_grad_enabled(), out=out.detach().clone()))
            return out

        def process_batch(self, *a, **kw):
            bound = inspect.signature(tn.NetworkTrainer.process_batch).bind(self, *a, **kw)
            self.batches.append(bound.arguments.get("is_train", True))
            return super().process_batch(*a, **kw)

        def on_validation_step_end(self, *a, **kw):
            self.val_step_ends += 1
            return super().on_validation_step_end(*a, **kw)

        def assert_extra_args(self, *a, **kw):
            out = super().assert_extra_args(*a, **kw)
            reg, spy = self.privacy_regularizer, self
            original = reg.features

            def features(pred, target, timesteps=None, reference=None):
                result = original(pred, target, timesteps, reference=reference)
                spy.feature_calls.append(dict(pred=pred.detach().clone(), target=target.detach().clone(),
                                              reference=None if reference is None else reference.clone(),
                                              result=result.detach().clone(), n_unet=len(spy.unet_calls)))
                return result

            reg.features = features
            return out

    return Spy


def test_calibrated_features_use_the_lora_off_prediction_at_the_same_inputs(data, tmp_path):  # noqa: F811
    tn = standin()
    trainer = spy_class(tn)()
    trainer.train(parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "3"), *PRIV,
                        "--privacy_holdout_dir", str(data / "holdout"), "--privacy_calibrated",
                        "--privacy_nonmember_every", "1"))
    reg = trainer.privacy_regularizer
    assert reg.config.calibrated and reg.global_step == 3 and reg.attacker_updates == 3
    assert len(trainer.feature_calls) == 3 + 3                   # members + a non-member batch every step
    network = trainer._network
    for call in trainer.feature_calls:
        base, lora = trainer.unet_calls[call["n_unet"] - 2], trainer.unet_calls[call["n_unet"] - 1]
        # one no-grad forward with the LoRA off, then the LoRA forward, at identical inputs
        assert base["m"] == 0.0 and not base["grad"] and lora["m"] == 1.0
        assert torch.equal(base["x"], lora["x"]) and torch.equal(base["t"], lora["t"])
        assert torch.equal(call["pred"], lora["out"]) and torch.equal(call["reference"], base["out"])
        # the test's own forward with multiplier 0 at those inputs
        with torch.no_grad():
            network.set_multiplier(0.0)
            try:
                expected_base = tn.NetworkTrainer.call_unet(trainer, None, None, lora["unet"], lora["x"], lora["t"],
                                                            [], {}, torch.float32)
            finally:
                network.set_multiplier(1.0)
        torch.testing.assert_close(call["reference"], expected_base, rtol=0, atol=1e-6)
        assert (call["pred"] - expected_base).abs().max() > 1e-3          # the LoRA was really switched off
        pred, target = call["pred"], call["target"]
        expected = F.adaptive_avg_pool2d((pred - target) ** 2 - (expected_base - target) ** 2, (4, 4)).flatten(1)
        raw = F.adaptive_avg_pool2d((pred - target) ** 2, (4, 4)).flatten(1)
        torch.testing.assert_close(call["result"], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(call["result"], raw, atol=1e-4)
    assert network.multiplier == 1.0
    # kohya's hook after a forward without backward runs after every base forward
    assert trainer.val_step_ends >= len(trainer.feature_calls)


def test_no_extra_forward_without_calibration(data, tmp_path):  # noqa: F811
    tn = standin()
    runs = {}
    for flag in ("--no-privacy_calibrated", "--privacy_calibrated"):
        trainer = spy_class(tn)()
        trainer.train(parse(*kohya_args(data, tmp_path / flag, "--max_train_steps", "3"), *PRIV,
                            "--privacy_holdout_dir", str(data / "holdout"), flag))
        runs[flag] = trainer
    plain, calibrated = runs["--no-privacy_calibrated"], runs["--privacy_calibrated"]
    assert len(plain.unet_calls) == len(plain.batches)                 # one forward per process_batch
    assert all(c["m"] == 1.0 for c in plain.unet_calls)
    assert all(c["reference"] is None for c in plain.feature_calls)
    base_calls = [c for c in calibrated.unet_calls if c["m"] == 0.0]
    assert len(base_calls) == len(calibrated.feature_calls)            # one base forward per feature batch
    assert len(calibrated.unet_calls) == len(calibrated.batches) + len(base_calls)
    # the replay leaves kohya's random streams alone: the training forwards draw the same noise and timesteps
    train_plain = [c for c in plain.unet_calls if c["grad"]]
    train_cal = [c for c in calibrated.unet_calls if c["grad"]]
    assert len(train_plain) == len(train_cal) == 3
    for a, b in zip(train_plain, train_cal):
        assert torch.equal(a["t"], b["t"]) and torch.equal(a["x"], b["x"])


def test_previous_multiplier_is_restored_also_after_an_exception(data, tmp_path):  # noqa: F811
    tn = standin()
    trainer = spy_class(tn, start_multiplier=0.75)()
    trainer.train(parse(*kohya_args(data, tmp_path / "a", "--max_train_steps", "2"), *PRIV,
                        "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust"))
    assert {c["m"] for c in trainer.unet_calls} == {0.0, 0.75}           # LoRA forwards keep the user's multiplier
    assert trainer._network.multiplier == 0.75
    trainer = spy_class(tn, raise_at_zero=True, start_multiplier=0.75)()
    with pytest.raises(RuntimeError, match="base forward failed"):
        trainer.train(parse(*kohya_args(data, tmp_path / "b", "--max_train_steps", "2"), *PRIV,
                            "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust"))
    assert trainer._network.multiplier == 0.75 and not trainer.unet_calls


def test_lora_off_and_lora_switch_units():
    tn = standin()
    from smplora_plugin.integrations.kohya.capture import lora_off, lora_switch

    net = tn.TinyLoRANetwork(2, multiplier=0.5)
    with pytest.raises(ValueError):
        with lora_off(net):
            assert net.multiplier == 0.0
            raise ValueError("boom")
    assert net.multiplier == 0.5
    assert lora_switch(SimpleNamespace(module=net)) is net                     # DDP-style wrapper
    acc = SimpleNamespace(unwrap_model=lambda m: m.inner)
    assert lora_switch(SimpleNamespace(inner=net), acc) is net
    with pytest.raises(SmploraError, match="has no set_multiplier"):
        lora_switch(torch.nn.Linear(2, 2), network_module="networks.other")
    del net.multiplier
    with pytest.raises(SmploraError, match="no numeric 'multiplier' attribute"):
        lora_switch(net)


def test_replay_rng_restore_unit():
    import random

    import numpy as np

    from smplora_plugin.integrations.kohya import data as kdata

    snap = kdata.rng_snapshot(torch.device("cpu"))
    first = (torch.randn(3), random.random(), np.random.rand())
    kdata.rng_restore(snap)
    second = (torch.randn(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


@pytest.mark.parametrize("broken", ["no_set_multiplier", "no_multiplier"])
def test_network_without_a_switch_fails_before_training(data, tmp_path, broken, capsys, monkeypatch):  # noqa: F811
    tn = standin()
    if broken == "no_set_multiplier":
        monkeypatch.delattr(tn.TinyLoRANetwork, "set_multiplier")
    else:
        original_init = tn.TinyLoRANetwork.__init__

        def init(self, *a, **kw):
            original_init(self, *a, **kw)
            del self.multiplier

        monkeypatch.setattr(tn.TinyLoRANetwork, "__init__", init)
        monkeypatch.setattr(tn.TinyLoRANetwork, "forward", lambda self, x: self.lora_up(self.lora_down(x)))
    steps = []
    original = tn.NetworkTrainer.process_batch

    @functools.wraps(original)
    def process_batch(self, *a, **kw):
        steps.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(tn.NetworkTrainer, "process_batch", process_batch)
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), *PRIV,
                "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust")
    err = capsys.readouterr().err
    assert rc == 2 and not steps and not (out / "lora.safetensors").exists()
    assert "TinyLoRANetwork" in err and "--privacy_preset paper" in err and "--no-privacy_calibrated" in err
    assert ("has no set_multiplier()" if broken == "no_set_multiplier" else "no numeric 'multiplier'") in err
    # the same network trains without calibrated features
    rc = launch("train_network.py", *kohya_args(data, tmp_path / "paper", "--max_train_steps", "2"), *PRIV,
                "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "paper")
    assert rc == 0 and steps


def own_generator_trainer(tn):
    """A stand-in trainer that draws timesteps from its own generator, which the base replay cannot rewind."""

    class OwnGenerator(tn.NetworkTrainer):
        gen = torch.Generator().manual_seed(0)

        def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                      unet, network, weight_dtype, train_unet, is_train=True):
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=self.gen)
            abar = noise_scheduler.alphas_cumprod[t][:, None, None, None]
            noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            with torch.set_grad_enabled(is_train):
                pred = self.call_unet(args, accelerator, unet, noisy, t, text_encoder_conds, batch, weight_dtype)
            return pred, noise, t, None

    return OwnGenerator


def test_replay_that_draws_other_noise_is_refused(data, tmp_path):  # noqa: F811
    tn = standin()
    from smplora_plugin.integrations.kohya import private_trainer_class

    OwnGenerator = own_generator_trainer(tn)

    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "2"), *PRIV,
                 "--privacy_holdout_dir", str(data / "holdout"))
    private_trainer_class(OwnGenerator)().train(args)                 # fine without calibration
    args.privacy_calibrated = True
    with pytest.raises(SmploraError, match="drew different noise or timesteps"):
        private_trainer_class(OwnGenerator)().train(args)


# ---------------------------------------------------------------------------- end to end
def robust_toml(tmp_path, data):  # noqa: F811
    """A kohya config file whose [smplora] section picks the robust preset (tiny attacker)."""
    toml = tmp_path / "cfg.toml"
    toml.write_text(f'[smplora]\nprivacy = "smplora"\nprivacy_preset = "robust"\n'
                    f'privacy_holdout_dir = "{data / "holdout"}"\n'
                    'privacy_feature_grid = 4\nprivacy_attacker_hidden = [8]\n')
    return toml


def test_robust_run_trains_saves_and_resumes(data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    toml = robust_toml(tmp_path, data)
    rc = launch("train_network.py", "--config_file", str(toml),
                *kohya_args(data, out, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state"))
    assert rc == 0
    for ckpt in ("lora-step00000001.safetensors", "lora.safetensors"):
        meta = header(out / ckpt)
        cfg = json.loads(meta["smplora.config"])
        assert cfg["calibrated"] is True and cfg["alpha"] == ROBUST.alpha and cfg["attacker_lr"] == ROBUST.attacker_lr
        assert (out / ckpt.replace(".safetensors", ".smplora_state")).is_file()
    metrics = json.loads(header(out / "lora.safetensors")["smplora.metrics"])
    # batch 2 with privacy_fraction 0.25 over steps: a privacy row on step 0, none on step 1
    assert metrics["attacker_updates"] == 1 and metrics["step"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    state = out / "lora-state" / "smplora_state.safetensors"
    assert state.is_file()
    # resume on the command line with the same preset: the attacker continues
    tn = standin()
    from smplora_plugin import PrivacyRegularizer
    from smplora_plugin.integrations.kohya import make_private_trainer

    assert PrivacyRegularizer.load(state).config.calibrated
    resume = ["--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust"]
    trainer = make_private_trainer(tn.NetworkTrainer)
    trainer.train(parse(*kohya_args(data, tmp_path / "out2", "--max_train_steps", "2", "--resume",
                                    str(out / "lora-state")), *PRIV, *resume))
    reg = trainer.privacy_regularizer
    # the schedule continues from the saved step: a row on step 2, none on step 3
    assert reg.config.calibrated and reg.attacker_updates == 2 and reg.global_step == 4
    # an uncalibrated attacker cannot silently continue a calibrated one
    trainer = make_private_trainer(tn.NetworkTrainer)
    with pytest.raises(StateError,
                       match=r"other privacy settings. To continue it, pass --privacy_calibrated \(this run: "
                             r"--no-privacy_calibrated\)"):
        trainer.train(parse(*kohya_args(data, tmp_path / "out3", "--resume", str(out / "lora-state")), *PRIV, *resume,
                            "--no-privacy_calibrated"))
    assert not (tmp_path / "out3").exists()


def test_text_encoder_only_lora_with_calibration_is_refused_before_anything_is_written(data, tmp_path):  # noqa: F811
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "1"), *PRIV,
                 "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust")
    args.network_train_text_encoder_only = True      # sd-scripts' option (the stand-in has no text encoder)
    with pytest.raises(ConfigError, match="network_train_text_encoder_only"):
        make_private_trainer(tn.NetworkTrainer).train(args)
    assert not (tmp_path / "out").exists()
