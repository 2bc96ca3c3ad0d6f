"""The sd_trainer_smplora process end to end on the ai-toolkit stand-in (tests/ai_toolkit_standin): privacy term,
held-out forward, header keys, progress bar, checkpoints with attacker state, resume, errors before any file."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from smplora_plugin.errors import ConfigError, HoldoutError, StateError
from smplora_plugin.state import read_state

_HARNESS = Path(__file__).parent / "ai_toolkit_standin" / "harness.py"
_spec = importlib.util.spec_from_file_location("aitk_harness", _HARNESS)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return harness.Session.get(lambda: tmp_path_factory.mktemp("aitk_session"))


@pytest.fixture
def data(tmp_path):
    harness.write_images(tmp_path / "train", 6, seed=1)
    harness.write_images(tmp_path / "holdout", 4, seed=2)
    return tmp_path


def ai_toolkit_keys(head):
    return {k: v for k, v in head.items() if not k.startswith("smplora.") and k != "sshs_model_hash"}


def test_privacy_run_keeps_the_trainers_loss_keys_and_rng(session, data, capsys):
    plain = session.run(harness.job_config(data / "plain", process_type="sd_trainer",
                                           datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    plain_bar = capsys.readouterr().err
    proc = session.run(harness.job_config(data, privacy=harness.small_privacy(data)))
    bar = capsys.readouterr().err
    root = data / "out" / "tiny"
    # the trainer's loss display: the first step's loss is the plain run's, to the bit (the held-out forward ran
    # before it in forked random streams), and the bar shows it next to the attacker's figures
    assert proc.losses_seen[0] == plain.losses_seen[0]
    assert "loss: " in bar and "mia_ce: " in bar and "mia_acc: " in bar
    assert "mia_ce" not in plain_bar
    assert {"step", "loss"} <= set(proc.logged[-1]) and "smplora/attacker_ce_member" in proc.logged[-1]
    reg = proc._smplora.reg
    assert reg.global_step == 4 and reg.attacker_updates == 4
    # checkpoints: ai-toolkit's header keys as in the plain run, plus smplora.*
    for name in ("tiny_000000002.safetensors", "tiny.safetensors"):
        head = harness.header(root / name)
        plain_head = harness.header(data / "plain" / "out" / "tiny" / name)
        assert ai_toolkit_keys(head) == ai_toolkit_keys(plain_head)
        assert head["smplora.integration"] == "ai-toolkit" and head["smplora.method"] == "smp-lora"
    final = harness.header(root / "tiny.safetensors")
    assert json.loads(final["smplora.metrics"])["attacker_updates"] == 4.0
    assert json.loads(final["smplora.data"])["counts"] == {"member": 6, "nonmember": 4}
    # attacker state next to each checkpoint, and the manifest with hashes
    assert read_state(root / "_smplora" / "tiny_000000002.smplora_state")["meta.counters"] == json.dumps(
        {"global_step": 3, "attacker_updates": 3, "attacker_steps": 3})
    assert (root / "_smplora" / "tiny.smplora_state").is_file()
    manifest = json.loads((root / "_smplora" / "holdout_manifest.json").read_text())
    assert len(manifest["sets"]["member"]) == 6 and all("sha256" in e for e in manifest["sets"]["nonmember"])


def test_no_privacy_block_trains_as_sd_trainer(session, data):
    a = session.run(harness.job_config(data / "a", process_type="sd_trainer",
                                       datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    b = session.run(harness.job_config(data / "b", process_type="sd_trainer_smplora",
                                       datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    assert a.losses_seen == b.losses_seen and b._smplora is None
    assert harness.header(data / "a" / "out" / "tiny" / "tiny.safetensors") == \
        harness.header(data / "b" / "out" / "tiny" / "tiny.safetensors")


def test_resume_continues_the_attacker(session, data):
    cfg = harness.job_config(data, privacy=harness.small_privacy(data, nonmember_every=2), steps=4)
    first = session.run(cfg)
    assert first._smplora.reg.global_step == 4
    cfg["config"]["process"][0]["train"]["steps"] = 6
    second = session.run(cfg)
    run = second._smplora
    assert run.resumed_from == "tiny.safetensors" and run.resumed_from_step == 4
    assert run.reg.global_step == 6 and run.reg.attacker_updates == 6
    head = harness.header(data / "out" / "tiny" / "tiny.safetensors")
    assert json.loads(head["smplora.data"])["resumed_from_step"] == 4
    assert json.loads(head["training_info"])["step"] == 6


def test_states_follow_the_checkpoints_ai_toolkit_keeps(session, data):
    cfg = harness.job_config(data, privacy=harness.small_privacy(data), steps=5, save_every=1)
    cfg["config"]["process"][0]["save"]["max_step_saves_to_keep"] = 2
    session.run(cfg)
    root = data / "out" / "tiny"
    kept = sorted(p.name for p in root.glob("*.safetensors"))
    states = sorted(p.name for p in (root / "_smplora").glob("*.smplora_state"))
    assert kept == ["tiny.safetensors", "tiny_000000003.safetensors", "tiny_000000004.safetensors"]
    assert states == [n.replace(".safetensors", ".smplora_state") for n in kept]


def test_robust_preset_base_forward_on_the_privacy_rows(session, data):
    proc = session.run(harness.job_config(data, privacy=harness.small_privacy(data, preset="robust", feature_grid=4)))
    reg = proc._smplora.reg
    assert reg.config.calibrated and reg.config.privacy_fraction == 0.25
    # batch 2, a quarter of each batch over steps: rows 1, 0, 1, 0 -> two attacker updates in four steps
    assert reg.global_step == 4 and reg.attacker_updates == 2
    assert json.loads(harness.header(data / "out" / "tiny" / "tiny.safetensors")["smplora.data"])[
        "feature_rows"]["member"] == 2
    # the base prediction: the same predict_noise call with the LoRA off, on the rows asked for, nothing changed
    from toolkit.prompt_utils import PromptEmbeds

    from smplora_plugin.integrations.ai_toolkit.forward import base_prediction

    net = proc.network
    net.multiplier = 1.0
    with torch.no_grad():
        net.lora_up.weight.fill_(0.3)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    text = PromptEmbeds(torch.randn(3, 8))
    call = {"noisy_latents": x, "timesteps": t, "conditional_embeds": text, "unconditional_embeds": None,
            "batch": None, "is_primary_pred": True}
    rng = torch.get_rng_state()
    base = base_prediction(proc, lambda **kw: type(proc).__mro__[1].predict_noise(proc, **kw), call, [0, 2], 3)
    assert torch.equal(torch.get_rng_state(), rng) and net.is_active is False
    with torch.no_grad():
        off = proc.sd.unet(x, t, text.text_embeds)
        net.is_active = True
        on = proc.sd.unet(x, t, text.text_embeds)
        net.is_active = False
    assert torch.allclose(base, off[[0, 2]], atol=1e-6) and not torch.allclose(base, on[[0, 2]])


def test_regularisation_images_are_never_members(session, data):
    harness.write_images(data / "reg", 4, seed=3)
    datasets = [{"folder_path": str(data / "train"), "resolution": 16},
                {"folder_path": str(data / "reg"), "resolution": 16, "is_reg": True}]
    proc = session.run(harness.job_config(data, privacy=harness.small_privacy(data), datasets=datasets, save_every=0))
    run = proc._smplora
    assert run.reg_only_batches == 2 and run.reg.global_step == 2   # even steps take a regularisation batch
    manifest = json.loads((data / "out" / "tiny" / "_smplora" / "holdout_manifest.json").read_text())
    assert len(manifest["sets"]["regularization"]) == 4 and len(manifest["sets"]["member"]) == 6


def test_gradient_accumulation_updates_the_attacker_once_per_step(session, data):
    proc = session.run(harness.job_config(data, privacy=harness.small_privacy(data), steps=3, save_every=0,
                                          train={"gradient_accumulation": 2}))
    reg = proc._smplora.reg
    assert reg.global_step == 6 and reg.attacker_updates == 3


def _nothing_written(data):
    return not (data / "out").exists()


@pytest.mark.parametrize("change, error, text", [
    ({"alpha": -1}, ConfigError, "privacy.alpha"),
    ({"method": "dpsgd"}, ConfigError, "privacy.hidden, .* configure the SMP-LoRA term"),
    ({"holdout_folder": "MISSING"}, HoldoutError, "privacy.holdout_folder"),
])
def test_bad_block_refused_before_any_file(session, data, change, error, text):
    block = harness.small_privacy(data, **change)
    if block["holdout_folder"] == "MISSING":
        block["holdout_folder"] = str(data / "missing")
    with pytest.raises(error, match=text):
        session.job(harness.job_config(data, privacy=block))
    assert _nothing_written(data)


def test_overlap_and_setup_refused_before_any_file(session, data):
    shutil.copy(data / "train" / "img_1_000.png", data / "holdout" / "copy.png")
    with pytest.raises(HoldoutError, match="byte-identical"):
        session.job(harness.job_config(data, privacy=harness.small_privacy(data)))
    (data / "holdout" / "copy.png").unlink()
    with pytest.raises(ConfigError, match="train.pred_scaler"):
        session.job(harness.job_config(data, privacy=harness.small_privacy(data), train={"pred_scaler": 2.0}))
    with pytest.raises(ConfigError, match="start of '_smplora'"):
        session.job(harness.job_config(data, name="_smp", privacy=harness.small_privacy(data)))
    with pytest.raises(ConfigError, match="needs a network"):
        session.job(harness.job_config(data, privacy=harness.small_privacy(data), network=None))
    assert _nothing_written(data)


def test_saved_state_with_other_settings_refused_before_training(session, data):
    session.run(harness.job_config(data, privacy=harness.small_privacy(data), steps=2))
    config_copy = data / "out" / "tiny" / "config.yaml"
    before = config_copy.stat().st_mtime_ns
    with pytest.raises(StateError, match="privacy.alpha: saved 0.05, this run 2.0"):
        session.job(harness.job_config(data, privacy=harness.small_privacy(data, alpha=2.0), steps=4))
    assert config_copy.stat().st_mtime_ns == before
