"""The privacy: block of the ai-toolkit process: presets and defaults as in every trainer, errors naming the key."""

from __future__ import annotations

import pytest

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.dp import DPError, dp_options
from smplora_plugin.errors import ConfigError, HoldoutError
from smplora_plugin.integrations.ai_toolkit.config import (
    check_train_options,
    parse_privacy_block,
    refused_train_options,
)


@pytest.fixture
def holdout(tmp_path):
    folder = tmp_path / "holdout"
    folder.mkdir()
    return str(folder)


def test_absent_or_none_is_no_privacy(holdout):
    assert parse_privacy_block(None) is None
    assert parse_privacy_block({"method": "none", "alpha": 3}) is None


@pytest.mark.parametrize("preset", ["paper", "robust"])
def test_presets_are_the_cores(holdout, preset):
    s = parse_privacy_block({"preset": preset, "holdout_folder": holdout})
    assert s.config == PrivacyConfig.preset(preset, seed=0)
    assert s.method == "smplora" and s.preset == preset


def test_keys_override_the_preset_and_seed_defaults_to_training_seed(holdout):
    s = parse_privacy_block({"method": "mplora", "preset": "robust", "holdout_folder": holdout, "alpha": 3,
                             "hidden": [32, 16], "feature_grid": [8, 4], "calibrated": False}, default_seed=7)
    assert s.config == PrivacyConfig.preset("robust", objective="mp", alpha=3.0, hidden=(32, 16), feature_grid=(8, 4),
                                            calibrated=False, seed=7)
    assert parse_privacy_block({"holdout_folder": holdout, "hidden": "64,32", "feature_grid": 0}).config.hidden == \
        (64, 32)
    assert parse_privacy_block({"holdout_folder": holdout, "feature_grid": 0}).config.feature_grid is None


@pytest.mark.parametrize("block, key", [
    ({"alpha": -1}, "privacy.alpha"),
    ({"attacker_lr": 0}, "privacy.attacker_lr"),
    ({"hidden": "a,b"}, "privacy.hidden"),
    ({"calibrated": "yes"}, "privacy.calibrated"),
    ({"preset": "strong"}, "privacy.preset"),
    ({"method": "smp-lora"}, "privacy.method"),
    ({"alpah": 1}, "privacy.alpah"),
])
def test_bad_values_name_the_key(holdout, block, key):
    with pytest.raises(ConfigError) as err:
        parse_privacy_block({"holdout_folder": holdout, **block})
    assert key in str(err.value)


def test_typo_gets_a_suggestion(holdout):
    with pytest.raises(ConfigError, match="Did you mean privacy.alpha"):
        parse_privacy_block({"holdout_folder": holdout, "alpah": 1})


def test_holdout_folder_is_required_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="privacy.holdout_folder is required"):
        parse_privacy_block({"method": "smplora"})
    with pytest.raises(HoldoutError, match="privacy.holdout_folder"):
        parse_privacy_block({"holdout_folder": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="privacy.attacker_state"):
        parse_privacy_block({"holdout_folder": str(tmp_path), "attacker_state": str(tmp_path / "nope")})


def test_dpsgd_is_dp_sgd_alone(holdout):
    s = parse_privacy_block({"method": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 0.05, "dp_delta": 1e-5,
                             "dp_accountant": "prv"}, default_seed=7)
    assert s.method == "dpsgd" and s.config is None and s.holdout_folder is None
    assert s.dp == dp_options("dpsgd", noise_multiplier=1.0, max_grad_norm=0.05, delta=1e-5, accountant="prv", seed=7)
    assert parse_privacy_block({"method": "dpsgd", "target_epsilon": 8, "holdout_folder": holdout,
                                "seed": 3}).dp.seed == 3


def test_smplora_with_noise_is_smp_plus_dp(holdout):
    s = parse_privacy_block({"preset": "robust", "holdout_folder": holdout, "noise_multiplier": 0.8})
    assert s.method == "smplora" and s.dp.noise_multiplier == 0.8 and s.dp.max_grad_norm == 1.0
    assert s.config.privacy_fraction == 1.0 and s.config.calibrated      # every row has its term under DP noise
    assert parse_privacy_block({"holdout_folder": holdout}).dp is None
    with pytest.raises(DPError, match="privacy.privacy_fraction=0.5 with DP noise"):
        parse_privacy_block({"holdout_folder": holdout, "noise_multiplier": 1.0, "privacy_fraction": 0.5})


@pytest.mark.parametrize("block, error, match", [
    ({"method": "dpsgd"}, DPError, "privacy.method: dpsgd needs a noise level"),
    ({"method": "dpsgd", "max_grad_norm": 1.0}, DPError, "needs a noise level"),
    ({"method": "dpsgd", "noise_multiplier": -1}, DPError, "privacy.noise_multiplier=-1"),
    ({"method": "dpsgd", "noise_multiplier": 1, "target_epsilon": 8}, DPError, "not both"),
    ({"method": "dpsgd", "noise_multiplier": 1, "dp_delta": 2}, DPError, "privacy.dp_delta=2"),
    ({"method": "dpsgd", "noise_multiplier": 1, "dp_accountant": "gdp"}, DPError, "privacy.dp_accountant='gdp'"),
    ({"method": "dpsgd", "noise_multiplier": 1, "delta": 1e-5}, ConfigError, "privacy.delta configures the SMP-LoRA"),
    ({"method": "dpsgd", "noise_multiplier": 1, "alpha": 2}, ConfigError, "privacy.alpha configures"),
    ({"method": "dpsgd", "noise_multiplier": 1, "seed": "x"}, ConfigError, "privacy.seed='x'"),
    ({"method": "none", "noise_multiplier": 1}, DPError, "privacy.noise_multiplier given with privacy.method: none"),
    ({"method": "smplora", "max_grad_norm": 1.0}, DPError, "privacy.max_grad_norm given without a DP mechanism"),
])
def test_bad_dp_keys_name_the_key(holdout, block, error, match):
    with pytest.raises(error, match=match):
        parse_privacy_block({"holdout_folder": holdout, **block} if block.get("method") != "dpsgd" else block)


def test_refused_train_options():
    assert refused_train_options({"loss_type": "mae", "lr": 1e-4}) == {}
    refused = refused_train_options({"loss_type": "mean_flow", "train_turbo": True, "pred_scaler": 2.0,
                                     "single_item_batching": True})
    assert set(refused) == {"train.loss_type", "train.train_turbo", "train.pred_scaler", "train.single_item_batching"}
    with pytest.raises(ConfigError, match="train.loss_target"):
        check_train_options({"loss_target": "source"})
    check_train_options({"loss_target": "noise", "pred_scaler": 1.0})


def test_example_yaml_is_valid(tmp_path):
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "ai_toolkit" / "train_lora_sd15_smplora.yaml"
    (proc,) = yaml.safe_load(example.read_text())["config"]["process"]
    assert proc["type"] == "sd_trainer_smplora"
    s = parse_privacy_block({**proc["privacy"], "holdout_folder": str(tmp_path)})
    assert s.config == PrivacyConfig.preset("robust", seed=0)
    check_train_options(proc["train"])


def test_dpsgd_example_yaml_is_valid(tmp_path):
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from smplora_plugin.integrations.ai_toolkit.dp_noise import check_process

    example = Path(__file__).parents[1] / "examples" / "ai_toolkit" / "train_lora_sd15_dpsgd.yaml"
    (proc,) = yaml.safe_load(example.read_text())["config"]["process"]
    assert proc["type"] == "sd_trainer_smplora"
    s = parse_privacy_block(proc["privacy"], default_seed=proc.get("training_seed"))
    assert s.method == "dpsgd" and s.dp == dp_options("dpsgd", noise_multiplier=1.0, max_grad_norm=1.0)
    check_process(proc)
