"""Every kohya trainer the launcher accepts, checked by reading its source against the one list of hooks
and parameters the mixin relies on (``compat.REQUIRED_HOOKS``): in CI against the stand-in, and against
every ``*_train_network.py`` of a real checkout when SD_SCRIPTS_DIR is set (nothing of it is imported)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from smplora_plugin.integrations.kohya.compat import KNOWN_TRAINERS, REQUIRED_HOOKS, trainer_source_problems

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "kohya_standin"
REAL = os.environ.get("SD_SCRIPTS_DIR")


@pytest.mark.parametrize("script", ["train_network.py", "sd3_train_network.py"])
def test_standin_trainers_match_the_hook_list(script):
    assert trainer_source_problems(STANDIN / script) == []


@pytest.mark.skipif(not REAL, reason="needs SD_SCRIPTS_DIR (a kohya sd-scripts checkout)")
@pytest.mark.parametrize("script", sorted(KNOWN_TRAINERS))
def test_real_trainers_match_the_hook_list(script):
    assert trainer_source_problems(Path(REAL) / script) == []


@pytest.mark.skipif(not REAL, reason="needs SD_SCRIPTS_DIR (a kohya sd-scripts checkout)")
def test_every_real_trainer_is_known():
    """A trainer added to sd-scripts shows up here, to be checked and listed in the README."""
    found = {p.name for p in Path(REAL).glob("*train_network.py")}
    assert found == set(KNOWN_TRAINERS)


def test_readme_kohya_table_lists_every_known_trainer():
    text = (REPO / "docs" / "kohya.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z0-9_]+\.py)` \|", text, flags=re.M))
    assert rows == set(KNOWN_TRAINERS)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"^\| `([a-z0-9_]+\.py)` \|", readme, flags=re.M)) >= set(KNOWN_TRAINERS)


def _trainer(tmp_path: Path, body: str, main: str = "    trainer = MyTrainer()\n    trainer.train(args)\n") -> Path:
    """A checkout holding the stand-in's train_network.py and a trainer script with ``body`` as its class body."""
    (tmp_path / "train_network.py").write_text((STANDIN / "train_network.py").read_text())
    script = tmp_path / "my_train_network.py"
    script.write_text("import train_network\n\n\nclass MyTrainer(train_network.NetworkTrainer):\n"
                      + textwrap.indent(textwrap.dedent(body), "    ")
                      + "\n\ndef setup_parser():\n    return train_network.setup_parser()\n\n\n"
                      "if __name__ == '__main__':\n    parser = setup_parser()\n"
                      "    args = parser.parse_args()\n" + main)
    return script


GNP = ("get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, "
       "{den}, network, weight_dtype, train_unet, is_train=True)")


def test_denoiser_named_dit_is_accepted(tmp_path):
    """Lumina's get_noise_pred_and_target calls its denoiser ``dit``; kohya passes it by position."""
    body = (f"def {GNP.format(den='dit')}:\n    def inner():\n        return dit\n"
            "    return inner(), latents, None, None\n")
    assert trainer_source_problems(_trainer(tmp_path, body)) == []


def test_renamed_or_missing_parameters_are_reported(tmp_path):
    body = (f"def {GNP.format(den='model')}:\n    return model, latents, None, None\n\n"
            "def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):\n"
            "    pass\n")
    problems = trainer_source_problems(_trainer(tmp_path, body))
    assert "MyTrainer.get_noise_pred_and_target() lacks parameter(s) unet|dit" in problems
    assert "MyTrainer.on_step_start() lacks parameter(s) is_train" in problems


def test_kwargs_catch_all_is_accepted(tmp_path):
    body = "def on_step_start(self, *args, **kwargs):\n    return super().on_step_start(*args, **kwargs)\n"
    assert trainer_source_problems(_trainer(tmp_path, body)) == []


def test_process_batch_that_bypasses_the_prediction_hook_is_reported(tmp_path):
    pb = ("def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, "
          "accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True, **kw):\n"
          "    return unet(batch)\n")
    problems = trainer_source_problems(_trainer(tmp_path, pb))
    assert problems == ["process_batch() neither calls super().process_batch() nor get_noise_pred_and_target()"]
    fixed = pb.replace("return unet(batch)", "return super().process_batch(batch, text_encoders, unet, **kw)")
    assert trainer_source_problems(_trainer(tmp_path, fixed)) == []


def test_prediction_hook_returning_one_tensor_is_reported(tmp_path):
    body = f"def {GNP.format(den='unet')}:\n    return unet(latents)\n"
    assert trainer_source_problems(_trainer(tmp_path, body)) == [
        "get_noise_pred_and_target() does not return (prediction, target, timesteps, ...)"]


def test_main_block_without_the_trainer_class_is_reported(tmp_path):
    script = _trainer(tmp_path, "pass\n", main="    train_network.NetworkTrainer().train(args)\n")
    assert trainer_source_problems(script) == ["the __main__ block does not call setup_parser() and MyTrainer()"]


def test_every_required_hook_is_checked(tmp_path):
    """Deleting any hook of the list from the base trainer is reported by name."""
    base = (STANDIN / "train_network.py").read_text()
    for hook in REQUIRED_HOOKS:
        assert f"    def {hook}(" in base
        (tmp_path / "train_network.py").write_text(base.replace(f"    def {hook}(", f"    def {hook}_gone("))
        assert f"{hook}() is missing" in trainer_source_problems(tmp_path / "train_network.py")
