"""kohya-style privacy options: argparse, the --config_file TOML ([smplora] section), validation."""

from __future__ import annotations

import argparse
import logging

import pytest
from test_kohya_standin import _clean_kohya_modules, data, kohya_args, launch, standin  # noqa: F401

from smplora_plugin.config import PrivacyConfig
from smplora_plugin.errors import ConfigError
from smplora_plugin.integrations.kohya import add_privacy_arguments, settings_from_namespace
from smplora_plugin.integrations.kohya.options import settings_from_mapping


def kohya_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file", type=str, default=None)
    p.add_argument("--seed", type=int, default=None)
    return add_privacy_arguments(p)


def test_cli_options_parse_and_validate():
    args = kohya_parser().parse_args(["--privacy", "smplora", "--privacy_alpha", "0.2", "--privacy_k_steps", "3",
                                      "--privacy_attacker_hidden", "64,32", "--privacy_feature_grid", "16,8",
                                      "--seed", "7"])
    s = settings_from_namespace(args)
    assert s.enabled and s.objective == "smp"
    assert s.config == PrivacyConfig(alpha=0.2, k_steps=3, hidden=(64, 32), feature_grid=(16, 8), seed=7)
    s = settings_from_namespace(kohya_parser().parse_args(["--privacy", "mplora", "--privacy_feature_grid", "0"]))
    assert s.objective == "mp" and s.config.feature_grid is None and s.config.seed == 0
    assert not settings_from_namespace(kohya_parser().parse_args([])).enabled


def test_parser_is_extended_once_and_keeps_kohya_style():
    p = kohya_parser()
    add_privacy_arguments(p)      # a second call is a no-op
    dests = [a.dest for a in p._actions]
    assert dests.count("privacy") == 1
    assert all(a.default is None for a in p._actions if a.dest.startswith("privacy"))   # --output_config friendly
    assert all(not a.required for a in p._actions)


def test_unknown_privacy_value_on_cli_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        kohya_parser().parse_args(["--privacy", "strong"])
    assert exc.value.code == 2
    assert "invalid choice: 'strong'" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"privacy": "strong"}, "privacy='strong' is unknown"),
    ({"privacy": "smplora", "privacy_alpha": -1.0}, "alpha=-1.0 is out of range"),
    ({"privacy": "smplora", "privacy_alpha": "lots"}, "alpha='lots' must be a number"),
    ({"privacy": "smplora", "privacy_k_steps": 1.5}, "k_steps=1.5 must be an integer"),
    ({"privacy": "smplora", "privacy_beta": 0}, "beta=0.0 is out of range"),
    ({"privacy": "smplora", "privacy_attacker_hidden": "512,x"}, "comma-separated positive ints"),
    ({"privacy": "smplora", "privacy_alhpa": 0.1}, "Did you mean 'privacy_alpha'"),
    ({"privacy": "smplora", "privacy_attacker_state": "/no/such/state"}, "does not exist"),
])
def test_values_that_skip_argparse_are_validated(values, message):
    """TOML values bypass argparse's type= and choices=: the plugin checks them itself."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_namespace(argparse.Namespace(**values))


def test_privacy_none_with_options_warns(caplog):
    caplog.set_level(logging.WARNING, logger="smplora.kohya")
    s = settings_from_namespace(argparse.Namespace(privacy="none", privacy_alpha=0.3))
    assert not s.enabled
    assert "NO membership-inference defense" in caplog.text


def test_mapping_for_in_process_callers():
    s = settings_from_mapping({"alpha": 0.3, "hidden": (16,), "privacy_holdout_dir": "/data/h"})
    assert s.objective == "smp" and s.config.alpha == 0.3 and s.config.hidden == (16,)
    assert str(s.holdout_dir) == "/data/h"
    s = settings_from_mapping({"objective": "mp"})
    assert s.objective == "mp"
    with pytest.raises(ConfigError, match="unknown config field"):
        settings_from_mapping({"alpah": 0.3})


def test_make_private_trainer_validates_config_early():
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    with pytest.raises(ConfigError, match="alpha"):
        make_private_trainer(tn.NetworkTrainer, {"alpha": -2})
    trainer = make_private_trainer(tn.NetworkTrainer, PrivacyConfig(alpha=0.1))
    assert type(trainer).__mro__[1].__name__ == "SmploraTrainerMixin"
    assert isinstance(trainer, tn.NetworkTrainer)
    assert trainer._smplora_override.config.alpha == 0.1


def test_toml_smplora_section_drives_a_run(data, tmp_path):  # noqa: F811
    toml = tmp_path / "cfg.toml"
    toml.write_text(f"""
[model]
network_dim = 2

[smplora]
privacy = "smplora"
privacy_alpha = 0.25
privacy_holdout_dir = "{data / 'holdout'}"
privacy_feature_grid = 4
privacy_attacker_hidden = [8]
""")
    out = tmp_path / "out"
    rc = launch("train_network.py", "--config_file", str(toml), "--train_data_dir", str(data / "train"),
                "--output_dir", str(out), "--output_name", "lora", "--max_train_steps", "2", "--privacy_alpha", "0.5")
    assert rc == 0
    import json

    from safetensors import safe_open

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["smplora.config"])
    assert cfg["alpha"] == 0.5          # the command line overrides the TOML, as in sd-scripts
    assert cfg["hidden"] == [8] and cfg["feature_grid"] == [4, 4]


@pytest.mark.parametrize("section, message", [
    ('[smplora]\nprivacy = "smplora"\nalpha = 0.1\n', "key 'alpha' in [smplora] is not a privacy option"),
    ('[smplora]\nprivacy = "smplora"\nprivacy_alpha = "high"\n', "alpha='high' must be a number"),
    ('[smplora]\nprivacy = "maximum"\n', "privacy='maximum' is unknown"),
])
def test_bad_toml_fails_before_training(data, tmp_path, section, message, capsys):  # noqa: F811
    toml = tmp_path / "cfg.toml"
    toml.write_text(section)
    rc = launch("train_network.py", "--config_file", str(toml), *kohya_args(data, tmp_path / "out"))
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_trainer_class_that_is_not_a_class_is_an_input_error_and_a_type_error():
    from smplora_plugin.errors import InputError
    from smplora_plugin.integrations.kohya import private_trainer_class

    with pytest.raises(InputError, match=r"expected a kohya trainer class .* got 'train_network'\.") as info:
        private_trainer_class("train_network")
    assert isinstance(info.value, TypeError)
