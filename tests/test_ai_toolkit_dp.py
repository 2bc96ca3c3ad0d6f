"""DP noise in the sd_trainer_smplora process on the ai-toolkit stand-in: privacy.method dpsgd end to end, the
noised update checked against the core's reference, the DP state saved and resumed exactly, SMP-LoRA + DP noise,
and bad options refused before any file."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from smplora_plugin.dp import DPError, DPGradients
from smplora_plugin.errors import ConfigError

pytest.importorskip("opacus")

_HARNESS = Path(__file__).parent / "ai_toolkit_standin" / "harness.py"
_spec = importlib.util.spec_from_file_location("aitk_harness_dp", _HARNESS)
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


def dpsgd(**over):
    return {"method": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 0.05, **over}


def test_dpsgd_end_to_end(session, data, capsys):
    plain = session.run(harness.job_config(data / "plain", process_type="sd_trainer",
                                           datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    capsys.readouterr()
    proc = session.run(harness.job_config(data, privacy=dpsgd()))
    out = capsys.readouterr()
    run, root = proc._smplora, data / "out" / "tiny"
    assert run.reg is None and run.dp.dp.steps == 4
    # ai-toolkit's own loss, untouched (the forward is the plain run's; only the update differs)
    assert proc.losses_seen[0] == plain.losses_seen[0]
    assert "eps: " in out.err and "mia_ce" not in out.err
    assert "DP-SGD alone" in out.out and "DP sampling: " in out.out and "fixed-size batches" in out.out
    assert "sigma 1, per-sample clip 0.05, batch 2 of 6" in out.out
    eps = proc.logged[-1]["smplora/epsilon"]
    assert eps == pytest.approx(run.dp.epsilon()) and math.isfinite(eps) and eps > 0
    assert proc.logged[0]["smplora/epsilon"] < eps
    head = harness.header(root / "tiny.safetensors")
    dp = json.loads(head["smplora.dp"])
    assert dp["epsilon"] == pytest.approx(run.dp.epsilon()) and dp["steps"] == 4
    assert dp["sigma"] == 1.0 and dp["clip"] == 0.05 and dp["sampling"] == "fixed_batch"
    assert dp["dataset_size"] == 6 and dp["expected_batch_size"] == 2
    assert head["smplora.method"] == "dp-sgd" and head["smplora.integration"] == "ai-toolkit"
    assert json.loads(harness.header(root / "tiny_000000002.safetensors")["smplora.dp"])["steps"] == 3
    # DP states next to the checkpoints (no attacker state: no attacker); the manifest lists the members
    assert sorted(p.name for p in (root / "_smplora").glob("*.smplora_dp")) == [
        "tiny.smplora_dp", "tiny_000000002.smplora_dp"]
    assert not list((root / "_smplora").glob("*.smplora_state"))
    manifest = json.loads((root / "_smplora" / "holdout_manifest.json").read_text())
    assert len(manifest["sets"]["member"]) == 6 and "nonmember" not in manifest["sets"]


class _Recorder:
    """The inputs of each training forward and the LoRA weights before the first one (stand-in methods wrapped)."""

    def __init__(self, monkeypatch):
        from extensions_built_in.sd_trainer.SDTrainer import SDTrainer

        self.calls, self.before = [], None
        original = SDTrainer.calculate_loss

        @functools.wraps(original)
        def calculate_loss(trainer, noise_pred, noise, noisy_latents, timesteps, batch, *a, **kw):
            if self.before is None:
                self.before = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
            if torch.is_grad_enabled():
                self.calls.append((noisy_latents.clone(), timesteps.clone(),
                                   trainer.sd.encode_prompt(batch.get_caption_list()).text_embeds.clone(),
                                   noise.clone()))
            return original(trainer, noise_pred, noise, noisy_latents, timesteps, batch, *a, **kw)

        monkeypatch.setattr(SDTrainer, "calculate_loss", calculate_loss)


def test_one_step_is_the_noised_clipped_update(session, data, monkeypatch):
    rec = _Recorder(monkeypatch)
    lr, sigma, clip = 0.5, 1.0, 0.05
    proc = session.run(harness.job_config(data, privacy=dpsgd(noise_multiplier=sigma, max_grad_norm=clip), steps=1,
                                          save_every=0, train={"optimizer": "sgd", "lr": lr,
                                                               "gradient_accumulation": 2}))
    assert len(rec.calls) == 2 and proc._smplora.dp.dp.expected_batch_size == 4
    # the reference: the core's DPGradients (a forward and backward per image) on the same inputs and weights
    net = copy.deepcopy(proc.network)
    net.load_state_dict(rec.before)
    unet = copy.deepcopy(proc.sd.unet)

    def loss_fn(model, x, t, text, noise):
        unet.network = model
        model.is_active, model.multiplier = True, [1.0]
        return F.mse_loss(unet(x, t, text).float(), noise.float())

    ref = DPGradients(net, noise_multiplier=sigma, max_grad_norm=clip, dataset_size=6, expected_batch_size=4,
                      sampling="fixed_batch", generator=torch.Generator().manual_seed(1), method="loop")
    norms = torch.cat([ref.accumulate(loss_fn, *call) for call in rec.calls])
    assert (norms > clip).all()                                  # every image's gradient was clipped
    clipped = [s / 4 for s in ref.clipped_sum]
    ref.step()
    after = load_file(str(data / "out" / "tiny" / "tiny.safetensors"))
    for (name, w0), p, plain in zip(rec.before.items(), net.parameters(), clipped):
        assert torch.allclose(after[name], w0 - lr * p.grad, atol=1e-7, rtol=0)
        assert not torch.allclose(after[name], w0 - lr * plain, atol=1e-4, rtol=0)   # the noise is in it


def test_resume_restores_the_dp_state_exactly(session, data):
    whole = session.run(harness.job_config(data / "whole", privacy=dpsgd(), steps=6, save_every=0,
                                           datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    cfg = harness.job_config(data, privacy=dpsgd(), steps=4, save_every=2)
    session.run(cfg)
    cfg["config"]["process"][0]["train"]["steps"] = 6
    resumed = session.run(cfg)
    run = resumed._smplora
    assert run.resumed_from == "tiny.safetensors" and run.dp.dp.steps == 6
    a, b = whole._smplora.dp.state_dict(), run.dp.state_dict()
    assert torch.equal(a["dp.rng"], b["dp.rng"])               # the noise generator continued, not restarted
    assert json.loads(a["dp.meta"])["accountant"] == json.loads(b["dp.meta"])["accountant"]
    assert run.dp.epsilon() == pytest.approx(whole._smplora.dp.epsilon(), rel=1e-9)
    head = harness.header(data / "out" / "tiny" / "tiny.safetensors")
    assert json.loads(head["smplora.dp"])["steps"] == 6
    # another sigma against the saved DP states: refused before ai-toolkit writes its config copy
    copy_file = data / "out" / "tiny" / "config.yaml"
    before = copy_file.stat().st_mtime_ns
    with pytest.raises(DPError, match="privacy.noise_multiplier: saved 1.0, this run 2.0"):
        session.job(harness.job_config(data, privacy=dpsgd(noise_multiplier=2.0), steps=8))
    assert copy_file.stat().st_mtime_ns == before


def test_resume_without_dp_state_is_refused(session, data):
    session.run(harness.job_config(data, process_type="sd_trainer", steps=2, save_every=0))
    with pytest.raises(DPError, match="has no DP state"):
        session.run(harness.job_config(data, privacy=dpsgd(), steps=4, save_every=0))


def test_smplora_with_dp_noise(session, data, capsys):
    block = harness.small_privacy(data, noise_multiplier=1.0, max_grad_norm=0.1)
    proc = session.run(harness.job_config(data, privacy=block))
    err = capsys.readouterr().err
    run = proc._smplora
    assert run.reg.global_step == 4 and run.reg.attacker_updates == 4 and run.dp.dp.steps == 4
    assert "mia_ce: " in err and "eps: " in err
    head = harness.header(data / "out" / "tiny" / "tiny.safetensors")
    assert head["smplora.method"] == "smp-lora" and json.loads(head["smplora.dp"])["steps"] == 4
    assert "caveat" in json.loads(head["smplora.dp"])                 # the attacker is not covered by epsilon
    assert sorted(p.suffix for p in (data / "out" / "tiny" / "_smplora").glob("tiny.*")) == [
        ".smplora_dp", ".smplora_state"]


@pytest.mark.parametrize("privacy, train, error, text", [
    ({"method": "dpsgd"}, {}, DPError, "needs a noise level"),
    (dpsgd(noise_multiplier=0), {}, DPError, "privacy.noise_multiplier=0"),
    (dpsgd(dp_delta=1.5), {}, DPError, "privacy.dp_delta=1.5"),
    (dpsgd(alpha=2.0), {}, ConfigError, "privacy.alpha configures the SMP-LoRA term"),
    (dpsgd(), {"dtype": "fp16"}, DPError, "fp16 mixed precision"),
    (dpsgd(), {"gradient_accumulation_steps": 2}, DPError, "Use train.gradient_accumulation: N instead"),
    (dpsgd(), {"short_and_long_captions": True}, DPError, "clipped twice"),
])
def test_bad_dp_options_refused_before_any_file(session, data, privacy, train, error, text):
    with pytest.raises(error, match=text):
        session.job(harness.job_config(data, privacy=privacy, train=train))
    assert not (data / "out").exists()


def test_dp_with_regularisation_dataset_refused_before_any_file(session, data):
    harness.write_images(data / "reg", 2, seed=3)
    datasets = [{"folder_path": str(data / "train"), "resolution": 16},
                {"folder_path": str(data / "reg"), "resolution": 16, "is_reg": True}]
    with pytest.raises(DPError, match=r"datasets\[1\] is a regularisation dataset"):
        session.job(harness.job_config(data, privacy=dpsgd(), datasets=datasets))
    assert not (data / "out").exists()


def test_a_lora_the_hooks_do_not_see_is_refused_at_the_first_step(session, data, monkeypatch):
    from toolkit.network_mixins import LoRASpecialNetwork

    def weight_space(self, x):      # the adapter applied from its weights, not by calling its layers
        if not self.is_active:
            return 0.0
        return F.conv2d(F.conv2d(x, self.lora_down.weight), self.lora_up.weight)

    monkeypatch.setattr(LoRASpecialNetwork, "delta", weight_space)
    with pytest.raises(DPError, match="held no per-sample gradient"):
        session.run(harness.job_config(data, privacy=dpsgd(), steps=2, save_every=0))


def test_smplora_with_dp_noise_refuses_a_loss_it_does_not_reproduce(session, data, monkeypatch):
    from extensions_built_in.sd_trainer.SDTrainer import SDTrainer

    original = SDTrainer.calculate_loss

    @functools.wraps(original)
    def weighted(trainer, *a, **kw):        # a weighting of the images that the per-image losses do not have
        return original(trainer, *a, **kw) * 1.5

    monkeypatch.setattr(SDTrainer, "calculate_loss", weighted)
    block = harness.small_privacy(data, noise_multiplier=1.0)
    with pytest.raises(DPError, match="is not the mean of its images' squared errors"):
        session.run(harness.job_config(data, privacy=block, steps=1, save_every=0))


def test_a_python_without_opacus_is_refused_before_any_file(session, data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "opacus", None)            # import opacus now fails
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(DPError, match=r"pip install 'smplora-plugin\[dp\]'"):
        session.job(harness.job_config(data, privacy=dpsgd()))
    assert not (data / "out").exists()


def test_dpsgd_with_a_holdout_checks_and_lists_it(session, data):
    import shutil

    from smplora_plugin.errors import HoldoutError

    session.run(harness.job_config(data, privacy=dpsgd(holdout_folder=str(data / "holdout")), steps=1,
                                   save_every=0))
    manifest = json.loads((data / "out" / "tiny" / "_smplora" / "holdout_manifest.json").read_text())
    assert len(manifest["sets"]["nonmember"]) == 4 and len(manifest["sets"]["member"]) == 6
    shutil.copy(data / "train" / "img_1_000.png", data / "holdout" / "copy.png")
    with pytest.raises(HoldoutError, match="byte-identical"):
        session.job(harness.job_config(data / "again", privacy=dpsgd(holdout_folder=str(data / "holdout")),
                                       datasets=[{"folder_path": str(data / "train"), "resolution": 16}]))
    assert not (data / "again").exists()
