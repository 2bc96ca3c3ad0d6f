"""--privacy_fraction in the kohya shim: only the first ``reg.privacy_rows(m)`` member rows of each batch
feed the privacy term, held-out batches are cut to ``reg.privacy_rows(size)`` rows before their forward
(and their base replay), and the calibrated base prediction of a training batch is replayed on the whole batch
with the denoiser running on those rows only (tests/test_kohya_base_rows.py)."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_kohya_calibrated import PRIV, ROBUST, kohya_parser, own_generator_trainer, robust_toml, spy_class
from test_kohya_standin import _clean_kohya_modules, data, header, kohya_args, launch, parse, standin  # noqa: F401

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import ConfigError, SmploraError
from smplora_plugin.integrations.kohya import add_privacy_arguments, settings_from_namespace
from smplora_plugin.integrations.kohya import data as kdata
from smplora_plugin.integrations.kohya.options import PRESET_OPTIONS, settings_from_mapping


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, expected", [
    ([], 1.0),
    (["--privacy_preset", "paper"], 1.0),
    (["--privacy_preset", "robust"], 0.25),
    (["--privacy_fraction", "0.5"], 0.5),
    (["--privacy_preset", "robust", "--privacy_fraction", "0.5"], 0.5),
    (["--privacy_fraction", "1", "--privacy_preset", "robust"], 1.0),
    (["--privacy_preset", "robust", "--no-privacy_calibrated"], 0.25),
])
def test_fraction_flag_and_preset(argv, expected):
    assert ROBUST.privacy_fraction == 0.25
    s = settings_from_namespace(kohya_parser().parse_args(["--privacy", "smplora", *argv]))
    assert s.config.privacy_fraction == expected


@pytest.mark.parametrize("value, message", [
    (0, "privacy_fraction=0.0 is out of range: it must be > 0.0 and <= 1.0"),
    (1.5, "privacy_fraction=1.5 is out of range"),
    (-0.25, "privacy_fraction=-0.25 is out of range"),
    ("half", "privacy_fraction='half' must be a number"),
    (float("nan"), "privacy_fraction=nan must be finite"),
])
def test_bad_fraction_values_are_config_errors(value, message):
    """TOML values skip argparse's type=: the core validates them, the shim names the kohya option."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as exc:
        settings_from_namespace(argparse.Namespace(privacy="smplora", privacy_fraction=value))
    assert "kohya option names" in str(exc.value)


def test_fraction_on_the_command_line_is_a_float_and_its_typo_is_named(capsys):
    with pytest.raises(SystemExit):
        kohya_parser().parse_args(["--privacy_fraction", "quarter"])
    assert "invalid float value: 'quarter'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Did you mean 'privacy_fraction'"):
        settings_from_namespace(argparse.Namespace(privacy="smplora", privacy_fracton=0.5))


def test_fraction_in_the_toml_section_and_the_command_line_on_top(tmp_path, monkeypatch):
    tn = standin()
    from library import train_util

    toml = tmp_path / "cfg.toml"
    parser = add_privacy_arguments(tn.setup_parser())

    def read(*cli):
        argv = ["--config_file", str(toml), *cli]
        monkeypatch.setattr(sys, "argv", ["train_network.py", *argv])
        return settings_from_namespace(train_util.read_config_from_file(parser.parse_args(argv), parser)).config

    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_preset = "robust"\n')
    assert read().privacy_fraction == 0.25 and read().calibrated
    assert read("--privacy_fraction", "0.75").privacy_fraction == 0.75
    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_preset = "robust"\nprivacy_fraction = 0.5\n')
    assert read().privacy_fraction == 0.5
    assert read("--privacy_fraction", "1").privacy_fraction == 1.0
    toml.write_text('[smplora]\nprivacy = "smplora"\nprivacy_fraction = 2\n')
    with pytest.raises(ConfigError, match="privacy_fraction=2.0 is out of range"):
        read()


def test_fraction_in_mappings_and_help_texts():
    assert settings_from_mapping({"privacy_fraction": 0.5}).config.privacy_fraction == 0.5     # a core field name
    assert settings_from_mapping({"privacy_preset": "robust"}).config.privacy_fraction == 0.25
    assert settings_from_mapping({"privacy_preset": "robust", "privacy_fraction": 1}).config.privacy_fraction == 1.0
    assert settings_from_mapping(PrivacyConfig(privacy_fraction=0.5)).config.privacy_fraction == 0.5
    assert "privacy fraction 0.25" in PRESET_OPTIONS["privacy_preset"]
    from smplora_plugin.integrations.kohya.launcher import USAGE

    assert "--privacy_fraction F" in USAGE
    helps = {a.dest: a.help for a in kohya_parser()._actions}
    assert "robust 0.25" in helps["privacy_fraction"] and "privacy fraction 0.25" in helps["privacy_preset"]


def test_bad_fraction_stops_the_launcher_before_anything_is_written(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "1"), *PRIV,
                "--privacy_holdout_dir", str(data / "holdout"), "--privacy_fraction", "1.5")
    assert rc == 2 and "privacy_fraction=1.5 is out of range" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- batch helpers
def kohya_batch(b: int = 4) -> dict:
    """The layout of an sd-scripts batch: per-sample tensors and lists, per-text-encoder lists, scalars, None."""
    return {
        "latents": torch.arange(b * 2 * 2 * 2, dtype=torch.float32).view(b, 2, 2, 2),
        "images": None,
        "loss_weights": torch.ones(b),
        "captions": [f"caption {i}" for i in range(b)],
        "custom_attributes": [{"smplora_role": "member", "i": i} for i in range(b)],
        "flippeds": [False] * b,
        "input_ids_list": [torch.arange(b * 3).view(b, 3), torch.arange(b * 5).view(b, 5)],    # 2 text encoders
        "text_encoder_outputs_list": (torch.zeros(b, 7, 8), None, torch.ones(b, 8)),
        "network_multipliers": torch.full((b,), 1.0),
        "step": 3, "scale": 0.5, "name": "bucket", "alpha_masks": None,
        "bucket_reso": torch.tensor([64, 64]),                 # leading size 2, not the batch size: kept
        "scalar": torch.tensor(1.5),                            # 0-dim: kept
        "pair": ("a", "b"),                                     # a tuple of another length: kept
        "extra": {"ids": torch.arange(b), "note": "x"},         # a nested dict: cut entry by entry
    }


def test_first_rows_cuts_every_per_sample_entry_and_leaves_the_rest():
    batch = kohya_batch(4)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    cut = kdata.first_rows(batch, 1, 4)
    assert cut is not batch and set(cut) == set(batch)
    assert torch.equal(cut["latents"], batch["latents"][:1]) and cut["latents"].shape == (1, 2, 2, 2)
    assert torch.equal(cut["loss_weights"], torch.ones(1)) and torch.equal(cut["network_multipliers"], torch.ones(1))
    assert cut["captions"] == ["caption 0"] and cut["flippeds"] == [False]
    assert cut["custom_attributes"] == [{"smplora_role": "member", "i": 0}]
    ids = cut["input_ids_list"]
    assert isinstance(ids, list) and len(ids) == 2 and ids[0].shape == (1, 3) and ids[1].shape == (1, 5)
    assert torch.equal(ids[1], batch["input_ids_list"][1][:1])
    te = cut["text_encoder_outputs_list"]
    assert isinstance(te, tuple) and len(te) == 3 and te[0].shape == (1, 7, 8) and te[1] is None
    assert te[2].shape == (1, 8)
    for key in ("images", "alpha_masks", "step", "scale", "name", "pair"):
        assert cut[key] is batch[key] or cut[key] == batch[key]
    assert cut["bucket_reso"] is batch["bucket_reso"] and cut["scalar"] is batch["scalar"]
    assert torch.equal(cut["extra"]["ids"], torch.tensor([0])) and cut["extra"]["note"] == "x"
    # the input is left as it was
    assert batch["latents"].shape[0] == 4 and len(batch["captions"]) == 4 and batch["input_ids_list"][0].shape[0] == 4
    assert all(torch.equal(batch[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))
    # n == batch size: equal values; other n: the first n rows
    whole = kdata.first_rows(batch, 4, 4)
    assert torch.equal(whole["latents"], batch["latents"]) and whole["captions"] == batch["captions"]
    two = kdata.first_rows(batch, 2, 4)
    assert two["captions"] == ["caption 0", "caption 1"] and two["text_encoder_outputs_list"][2].shape == (2, 8)


def test_first_rows_per_encoder_list_as_long_as_the_batch():
    """A list of batched tensors is a per-text-encoder list even when it has as many entries as the batch."""
    b = 3
    per_encoder = [torch.randn(b, 4), torch.randn(b, 5), torch.randn(b, 6)]
    cut = kdata.first_rows({"text_encoder_outputs_list": per_encoder, "captions": ["a", "b", "c"]}, 1, b)
    assert [t.shape for t in cut["text_encoder_outputs_list"]] == [(1, 4), (1, 5), (1, 6)]
    assert cut["captions"] == ["a"]
    assert kdata.first_rows(None, 1, b) is None and kdata.first_rows("abc", 1, 3) == "abc"
    assert kdata.first_rows(7, 1, b) == 7


def test_batch_rows():
    assert kdata.batch_rows(kohya_batch(4)) == 4
    assert kdata.batch_rows({"latents": None, "images": torch.zeros(3, 3, 8, 8), "captions": ["a"] * 3}) == 3
    assert kdata.batch_rows({"captions": ["a", "b"]}) == 2
    assert kdata.batch_rows({"captions": [], "step": 1}) is None
    assert kdata.batch_rows([torch.zeros(2)]) is None


# ---------------------------------------------------------------------------- against the stand-in
def fraction_spy(tn):
    """spy_class plus the real forward's full output and the batches of non-training process_batch calls."""

    class FractionSpy(spy_class(tn)):
        def __init__(self):
            super().__init__()
            self.forwards, self.eval_batches = [], []

        def get_noise_pred_and_target(self, *a, **kw):
            out = super().get_noise_pred_and_target(*a, **kw)
            self.forwards.append(dict(pred=out[0].detach().clone(), target=out[1].detach().clone(),
                                      t=out[2].clone(), n_unet=len(self.unet_calls)))
            return out

        def process_batch(self, *a, **kw):
            bound = inspect.signature(tn.NetworkTrainer.process_batch).bind(self, *a, **kw)
            if not bound.arguments.get("is_train", True):
                self.eval_batches.append(bound.arguments["batch"])
            return super().process_batch(*a, **kw)

    return FractionSpy


def train_spy(data, out, *extra, steps=3, batch=4):  # noqa: F811
    tn = standin()
    trainer = fraction_spy(tn)()
    trainer.train(parse(*kohya_args(data, out, "--max_train_steps", str(steps), "--train_batch_size", str(batch)),
                        *PRIV, "--privacy_holdout_dir", str(data / "holdout"), *extra))
    return tn, trainer


def split_calls(trainer):
    """(member, non-member) feature calls, each with the UNet calls of its base and its real forward."""
    member, nonmember = [], []
    for call in trainer.feature_calls:
        lora, base = trainer.unet_calls[call["n_unet"] - 1], trainer.unet_calls[call["n_unet"] - 2]
        forward = next(f for f in trainer.forwards if f["n_unet"] == call["n_unet"])
        (member if lora["grad"] else nonmember).append(dict(call, lora=lora, base=base, forward=forward))
    return member, nonmember


def lora_off_prediction(tn, trainer, unet, x, t):
    network = trainer._network
    previous = network.multiplier
    with torch.no_grad():
        network.set_multiplier(0.0)
        try:
            return tn.NetworkTrainer.call_unet(trainer, None, None, unet, x, t, [], {}, torch.float32)
        finally:
            network.set_multiplier(previous)


def test_quarter_of_a_batch_of_four_feeds_one_calibrated_member_row(data, tmp_path):  # noqa: F811
    tn, trainer = train_spy(data, tmp_path / "out", "--privacy_preset", "robust", "--privacy_nonmember_every", "1")
    reg = trainer.privacy_regularizer
    assert reg.config.privacy_fraction == 0.25 and reg.privacy_rows(4) == 1 and reg.global_step == 3
    member, nonmember = split_calls(trainer)
    assert len(member) == 3 and len(nonmember) == 3
    for call in member:
        lora, base, forward = call["lora"], call["base"], call["forward"]
        # the base forward is the whole batch replayed with the LoRA off, at the same noisy input and timesteps
        assert base["m"] == 0.0 and not base["grad"] and lora["m"] == 1.0
        assert base["x"].shape[0] == lora["x"].shape[0] == forward["pred"].shape[0] == 4
        assert torch.equal(base["x"], lora["x"]) and torch.equal(base["t"], lora["t"])
        # the regulariser got the first row of the full forward, and of the LoRA-off forward as reference
        assert call["pred"].shape[0] == call["target"].shape[0] == call["reference"].shape[0] == 1
        assert call["result"].shape == (1, 4 * 4 * 4)
        assert torch.equal(call["pred"], forward["pred"][:1]) and torch.equal(call["target"], forward["target"][:1])
        expected_base = lora_off_prediction(tn, trainer, lora["unet"], lora["x"][:1], lora["t"][:1])
        torch.testing.assert_close(call["reference"], expected_base, rtol=0, atol=1e-6)
        pred0, target0 = forward["pred"][:1], forward["target"][:1]
        expected = F.adaptive_avg_pool2d((pred0 - target0) ** 2 - (expected_base - target0) ** 2, (4, 4)).flatten(1)
        torch.testing.assert_close(call["result"], expected, rtol=1e-5, atol=1e-6)
        raw = F.adaptive_avg_pool2d((pred0 - target0) ** 2, (4, 4)).flatten(1)
        assert not torch.allclose(call["result"], raw, atol=1e-4)          # really calibrated
    # non-members: the held-out batch (4 images) cut to its first image before its forward and its base replay
    cut_batches = [b for b in trainer.eval_batches if b["latents"].shape[0] == 1]
    assert len(cut_batches) == 3
    pool = trainer._smplora.pool
    for counter, (call, batch) in enumerate(zip(nonmember, cut_batches)):
        full = pool.batch(counter)
        assert kdata.batch_rows(full) == 4
        assert torch.equal(batch["latents"], full["latents"][:1]) and batch["captions"] == full["captions"][:1]
        assert batch["custom_attributes"] == full["custom_attributes"][:1]
        lora, base = call["lora"], call["base"]
        assert base["x"].shape[0] == lora["x"].shape[0] == 1 and base["m"] == 0.0 and not lora["grad"]
        assert torch.equal(base["x"], lora["x"]) and torch.equal(base["t"], lora["t"])
        assert call["pred"].shape[0] == call["reference"].shape[0] == call["result"].shape[0] == 1
        torch.testing.assert_close(call["reference"], base["out"], rtol=0, atol=0)
    assert trainer._smplora.feature_rows == {"member": 3, "nonmember": 3}


def test_fraction_one_leaves_features_whole_and_the_first_row_is_the_same(data, tmp_path):  # noqa: F811
    common = ("--privacy_calibrated", "--privacy_nonmember_every", "1")
    _, whole = train_spy(data, tmp_path / "whole", *common, "--privacy_fraction", "1")
    _, default = train_spy(data, tmp_path / "default", *common)                # paper preset: fraction 1
    _, quarter = train_spy(data, tmp_path / "quarter", *common, "--privacy_fraction", "0.25")
    m_whole, n_whole = split_calls(whole)
    m_default, _ = split_calls(default)
    m_quarter, n_quarter = split_calls(quarter)
    assert [c["result"].shape[0] for c in m_whole] == [4, 4, 4] and [c["result"].shape[0] for c in n_whole] == [4] * 3
    assert [c["result"].shape[0] for c in m_quarter] == [1, 1, 1]
    assert [c["result"].shape[0] for c in n_quarter] == [1] * 3
    assert not [b for b in whole.eval_batches if b["latents"].shape[0] != 4]      # held-out batches not cut
    assert torch.equal(m_whole[0]["result"], m_default[0]["result"])           # same LoRA, same draws at step 1
    for a, b in zip(m_whole, m_default):   # later steps: two identical CPU runs differ by float rounding (~1e-7)
        torch.testing.assert_close(a["result"], b["result"], rtol=0, atol=1e-6)
        assert torch.equal(a["lora"]["t"], b["lora"]["t"]) and torch.equal(a["lora"]["x"], b["lora"]["x"])
    for call in m_whole:
        assert torch.equal(call["pred"], call["forward"]["pred"]) and torch.equal(call["reference"],
                                                                                  call["base"]["out"])
    # step 1 starts from the same LoRA and the same draws: the quarter's single row is the whole batch's first row
    # (its base forward ran on that row only: a 1-row convolution rounds differently from a 4-row one, ~2e-7)
    torch.testing.assert_close(m_quarter[0]["result"], m_whole[0]["result"][:1], rtol=0, atol=1e-6)
    # held-out passes: the whole held-out batch at fraction 1, its first image at 0.25
    assert torch.equal(whole.eval_batches[0]["latents"], whole._smplora.pool.batch(0)["latents"])
    assert torch.equal(quarter.eval_batches[0]["latents"], quarter._smplora.pool.batch(0)["latents"][:1])
    assert torch.equal(m_quarter[0]["lora"]["t"], m_whole[0]["lora"]["t"])
    assert whole._smplora.feature_rows == {"member": 12, "nonmember": 12}


def test_fraction_applies_to_the_member_rows_of_a_batch_with_regularisation_images(data, tmp_path):  # noqa: F811
    """Batches of 5 from 12 member and 2 regularisation keys: [5 members] x 2 and [2 members, 2 reg] (shuffled)."""
    _, trainer = train_spy(data, tmp_path / "out", "--reg_data_dir", str(data / "reg"), "--privacy_fraction", "0.5",
                           "--privacy_calibrated", steps=3, batch=5)
    member, _ = split_calls(trainer)
    rows = sorted(c["result"].shape[0] for c in member)
    assert rows == [1, 3, 3]           # ceil(0.5 * 5) of full batches, ceil(0.5 * 2) of the 2 members (not 2)
    for call in member:
        n = call["pred"].shape[0]
        assert torch.equal(call["pred"], call["forward"]["pred"][:n])      # reg images sit after the members
        assert torch.equal(call["reference"], call["base"]["out"][:n])


def test_a_replay_on_fewer_rows_would_draw_other_timesteps():
    """Why the member base forward is replayed on the whole batch: the trainer draws the noise of the whole
    batch, then its timesteps, from one generator (as sd-scripts does), so the first rows of an n-row draw
    are not the first rows of the B-row draw."""
    tn = standin()
    trainer = tn.NetworkTrainer()
    trainer._network = tn.TinyLoRANetwork(2)
    unet, sched, latents = tn.TinyUNet(), tn.NoiseScheduler(), torch.randn(4, 4, 8, 8)

    fp32 = SimpleNamespace(autocast=contextlib.nullcontext)     # an accelerator without mixed precision

    def draw(x):
        torch.manual_seed(11)
        return trainer.get_noise_pred_and_target(None, fp32, sched, x, {}, [], unet, None, torch.float32, True)

    full, cut = draw(latents), draw(latents[:1])
    assert torch.equal(full[1][:1], cut[1])            # the noise of the first row happens to match on CPU ...
    assert not torch.equal(full[2][:1], cut[2])        # ... its timestep does not


def test_replay_that_draws_other_noise_is_refused_with_a_fraction(data, tmp_path):  # noqa: F811
    tn = standin()
    from smplora_plugin.integrations.kohya import private_trainer_class

    OwnGenerator = own_generator_trainer(tn)

    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "2", "--train_batch_size", "4"), *PRIV,
                 "--privacy_holdout_dir", str(data / "holdout"), "--privacy_preset", "robust")
    with pytest.raises(SmploraError, match="drew different noise or timesteps"):
        private_trainer_class(OwnGenerator)().train(args)


def test_non_member_batch_entry_left_uncut_is_an_error(data, tmp_path, monkeypatch):  # noqa: F811
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    original = kdata.first_rows

    def leaves_latents_whole(value, n, b):
        out = original(value, n, b)
        if isinstance(value, dict) and "latents" in value:
            out["latents"] = value["latents"]
        return out

    monkeypatch.setattr(kdata, "first_rows", leaves_latents_whole)
    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "1", "--train_batch_size", "4"), *PRIV,
                 "--privacy_holdout_dir", str(data / "holdout"), "--privacy_fraction", "0.25")
    with pytest.raises(SmploraError, match="returned 4 predictions for a batch cut to its first 1 of 4"):
        make_private_trainer(tn.NetworkTrainer).train(args)


def test_robust_run_records_the_fraction_and_the_rows_it_fed(data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    toml = robust_toml(tmp_path, data)
    rc = launch("train_network.py", "--config_file", str(toml),
                *kohya_args(data, out, "--max_train_steps", "3", "--train_batch_size", "4"))
    assert rc == 0
    meta = header(out / "lora.safetensors")
    assert json.loads(meta["smplora.config"])["privacy_fraction"] == 0.25
    info = json.loads(meta["smplora.data"])
    # 3 steps x 1 member row; one held-out refresh (nonmember_every 4) of 1 of its 4 images
    assert info["feature_rows"] == {"member": 3, "nonmember": 1}
