"""smplora-kohya against the kohya stand-in (tests/kohya_standin): launcher, mixin, data, state.

The stand-in has the hook names and signatures of sd-scripts v0.10.x and calls them in the same
order; tests against a real checkout are in test_kohya_real.py (need SD_SCRIPTS_DIR).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

STANDIN = Path(__file__).parent / "kohya_standin"
KOHYA_MODULES = ("library", "train_network", "sd3_train_network")


# ---------------------------------------------------------------------------- fixtures
def _png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(path)


def make_folder(root: Path, sub: str, n: int, seed: int, caption: str) -> Path:
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(d / f"img_{i:02d}.png", seed * 1000 + i)
        (d / f"img_{i:02d}.caption").write_text(f"{caption} {i}")
    return d


@pytest.fixture
def data(tmp_path):
    """train/2_thing (6 images), reg/1_class (2), holdout/1_thing (4); all distinct."""
    make_folder(tmp_path / "train", "2_thing", 6, 1, "member")
    make_folder(tmp_path / "reg", "1_class", 2, 2, "reg")
    make_folder(tmp_path / "holdout", "1_thing", 4, 3, "holdout")
    return tmp_path


@pytest.fixture(autouse=True)
def _clean_kohya_modules():
    """The stand-in registers 'library' / 'train_network' modules and accelerate singletons: undo both."""
    path_before = list(sys.path)
    yield
    for name in list(sys.modules):
        if name in KOHYA_MODULES or name.startswith("library."):
            del sys.modules[name]
    sys.path[:] = path_before
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def standin():
    """Import the stand-in's train_network module (as the launcher would)."""
    sys.path.insert(0, str(STANDIN))
    import train_network

    return train_network


def kohya_args(data: Path, out: Path, *extra: str):
    return ["--train_data_dir", str(data / "train"), "--output_dir", str(out), "--output_name", "lora",
            "--seed", "3", "--train_batch_size", "2", "--network_dim", "2", *extra]


def parse(*argv: str):
    tn = standin()
    from smplora_plugin.integrations.kohya import add_privacy_arguments

    return add_privacy_arguments(tn.setup_parser()).parse_args(list(argv))


def header(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def launch(*argv: str) -> int:
    from smplora_plugin.integrations.kohya.launcher import main

    return main(["--sd_scripts", str(STANDIN), *argv])


# ---------------------------------------------------------------------------- end to end
def test_launcher_run_writes_metadata_state_and_manifest(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--reg_data_dir", str(data / "reg"),
                                                "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state"),
                "--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"), "--privacy_alpha", "0.5",
                "--privacy_attacker_lr", "1e-3", "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "16,8")
    assert rc == 0
    for ckpt in ("lora-step00000002.safetensors", "lora-step00000004.safetensors", "lora.safetensors"):
        meta = header(out / ckpt)
        assert meta["smplora.method"] == "smp-lora"
        cfg = json.loads(meta["smplora.config"])
        assert cfg["alpha"] == 0.5 and cfg["hidden"] == [16, 8] and cfg["feature_grid"] == [4, 4]
        metrics = json.loads(meta["smplora.metrics"])
        assert metrics["attacker_updates"] >= 1
        info = json.loads(meta["smplora.data"])
        assert info["counts"] == {"member": 6, "nonmember": 4, "regularization": 2}
        assert meta["modelspec.architecture"] == "standin-v1/lora" and "ss_network_dim" in meta
        state = out / ckpt.replace(".safetensors", ".smplora_state")
        assert state.is_file(), state
    # the step-2 checkpoint carries the metrics of step 2, not a stale copy of the final ones
    m2 = json.loads(header(out / "lora-step00000002.safetensors")["smplora.metrics"])
    mf = json.loads(header(out / "lora.safetensors")["smplora.metrics"])
    assert m2["step"] < mf["step"]
    assert (out / "lora-state" / "smplora_state.safetensors").is_file()
    assert (out / "lora-step00000004-state" / "smplora_state.safetensors").is_file()
    # a --save_state folder at a checkpoint's step links that checkpoint's state file: no second copy
    for step in ("00000002", "00000004"):
        a = (out / f"lora-step{step}.smplora_state").stat()
        b = (out / f"lora-step{step}-state" / "smplora_state.safetensors").stat()
        assert a.st_ino == b.st_ino
    assert json.loads(header(out / "lora.safetensors")["smplora.feature_grid"]) == [4, 4]
    from smplora_plugin.holdout import read_manifest

    sets = read_manifest(out / "lora_smplora_manifest.json")
    assert len(sets["member"]) == 6 and len(sets["nonmember"]) == 4 and len(sets["regularization"]) == 2
    assert all("/holdout/" in p for p in sets["nonmember"])
    assert "NEVER trained on" in capsys.readouterr().out     # the start-up summary box


def test_kohya_metadata_unchanged_and_privacy_none_is_plain(data, tmp_path):
    """Same run with and without --privacy: identical ss_* and modelspec keys; smplora.* only with it."""
    cfg = {"datasets": [
        {"subsets": [{"image_dir": str(data / "train" / "2_thing"), "num_repeats": 2}]},
        {"validation_split": 1.0, "subsets": [{"image_dir": str(data / "holdout" / "1_thing"), "num_repeats": 1}]}]}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    common = ["--dataset_config", str(tmp_path / "ds.json"), "--max_train_steps", "2"]
    assert launch("train_network.py", *kohya_args(data, tmp_path / "a", *common), "--privacy", "none") == 0
    assert launch("train_network.py", *kohya_args(data, tmp_path / "b", *common), "--privacy", "smplora",
                  "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8") == 0
    a, b = header(tmp_path / "a" / "lora.safetensors"), header(tmp_path / "b" / "lora.safetensors")
    volatile = {"ss_session_id", "ss_training_started_at", "sshs_model_hash"}   # per run: the weights differ
    assert not [k for k in a if k.startswith("smplora.")]
    assert {k: v for k, v in b.items() if not k.startswith("smplora.") and k not in volatile} == \
        {k: v for k, v in a.items() if k not in volatile}
    assert {"smplora.version", "smplora.method", "smplora.config", "smplora.metrics"} <= set(b)
    assert not (tmp_path / "a" / "lora.smplora_state").exists()


def test_kohya_validation_over_the_holdout_is_off_unless_asked(data, tmp_path, caplog):
    """kohya validates a validation dataset at the end of every epoch by default; over the privacy holdout
    that is a cost a plain run never pays, so the launcher switches it off unless the user asks for it."""
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    priv = ["--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"), "--privacy_feature_grid", "4",
            "--privacy_attacker_hidden", "8"]
    seen = {}
    for name, extra in {"default": [], "asked": ["--validate_every_n_epochs", "1"],
                        "carve-out": ["--validation_split", "0.34"]}.items():
        trainer = make_private_trainer(tn.NetworkTrainer)
        with caplog.at_level(logging.WARNING):   # 6 images x 2 repeats at batch 2: 6 steps an epoch, 2 epochs
            trainer.train(parse(*kohya_args(data, tmp_path / name, "--max_train_steps", "8", *extra), *priv))
        seen[name] = (trainer.validation_batches,
                      header(tmp_path / name / "lora.safetensors")["ss_validate_every_n_epochs"],
                      trainer.privacy_regularizer.attacker_updates)
        if name == "default":
            assert "validation pass over the held-out images is off" in caplog.text
            assert "--validate_every_n_epochs 1" in caplog.text
        caplog.clear()
    assert seen["default"][:2] == (0, "None")       # off, and the header says what the user gave: nothing
    assert seen["asked"][0] > 0 and seen["asked"][1] == "1"
    assert seen["carve-out"][0] > 0 and seen["carve-out"][1] == "None"   # the user's own validation: kohya's way
    assert all(updates >= 1 for _, _, updates in seen.values()), seen   # the attacker still gets its non-members


def test_attacker_updates_once_per_optimizer_step_and_reg_images_never_members(data, tmp_path):
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    trainer = make_private_trainer(tn.NetworkTrainer, {"alpha": 0.5, "attacker_lr": 1e-3, "feature_grid": 4,
                                                       "hidden": (8,)}, holdout_dir=data / "holdout")
    seen = []   # (is_train, number of rows the attacker features were taken from, rows that are members)
    original_features = None

    class Spy(type(trainer)):
        def process_batch(self, *a, **kw):
            bound = inspect.signature(tn.NetworkTrainer.process_batch).bind(self, *a, **kw)
            batch, is_train = bound.arguments["batch"], bound.arguments.get("is_train", True)
            members = sum(1 for c in batch["captions"] if c.startswith("member"))
            regs = sum(1 for c in batch["captions"] if c.startswith("reg"))
            seen.append({"is_train": is_train, "members": members, "regs": regs, "feature_rows": []})
            return super().process_batch(*a, **kw)

    spy = Spy()
    spy._smplora_override = trainer._smplora_override

    def features(pred, target, timesteps=None, reference=None):
        assert reference is None                     # paper preset: no base prediction
        seen[-1]["feature_rows"].append(pred.shape[0])
        return original_features(pred, target, timesteps, reference=reference)

    args = parse(*kohya_args(data, tmp_path / "out", "--reg_data_dir", str(data / "reg"), "--max_train_steps", "3",
                             "--gradient_accumulation_steps", "2"))
    real_assert = type(spy).assert_extra_args

    def assert_extra_args(self, *a, **kw):
        nonlocal original_features
        out = real_assert(self, *a, **kw)
        original_features = self.privacy_regularizer.features
        self.privacy_regularizer.features = features
        return out

    type(spy).assert_extra_args = assert_extra_args
    try:
        spy.train(args)
    finally:
        type(spy).assert_extra_args = real_assert
    reg = spy.privacy_regularizer
    assert spy.final_global_step == 3
    assert reg.attacker_updates <= 3            # once per optimiser step at most (reg-only steps skip it)
    train_calls = [s for s in seen if s["is_train"]]
    assert len(train_calls) == 6                # 3 optimiser steps x 2 micro-batches
    with_members = [s for s in train_calls if s["members"] > 0]
    assert reg.global_step == len(with_members)
    nonmember_forwards = [s for s in seen if not s["is_train"] and s["members"] == 0 and s["regs"] == 0]
    assert nonmember_forwards and reg.attacker_updates >= 1   # held-out forwards (kohya's validation pass is off)
    for s in train_calls:
        # member features come from member rows only; regularisation rows never reach the attacker
        assert s["feature_rows"][:1] == ([s["members"]] if s["members"] else [])
    assert sum(s["regs"] for s in train_calls) > 0     # regularisation rows were trained on


def test_gradient_accumulation_counts_exactly(data, tmp_path):
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    trainer = make_private_trainer(tn.NetworkTrainer, {"privacy": "smplora", "privacy_feature_grid": 4,
                                                       "privacy_attacker_hidden": "8", "privacy_holdout_dir":
                                                       str(data / "holdout")})
    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "3", "--gradient_accumulation_steps", "2"))
    trainer.train(args)
    reg = trainer.privacy_regularizer
    assert trainer.final_global_step == 3
    assert reg.attacker_updates == 3 and reg.attacker_steps == 3   # k_steps=1, once per optimiser step
    assert reg.global_step == 6                                     # the privacy term on every micro-batch
    logs = trainer.step_logs[-1]
    assert logs["smplora/attacker_updates"] == 3.0 and "smplora/attacker_ce_member" in logs
    assert "loss/current" in logs


def test_validation_split_carve_out_is_seeded_announced_and_never_trained(data, tmp_path, caplog, capsys):
    tn = standin()
    from smplora_plugin.holdout import read_manifest
    from smplora_plugin.integrations.kohya import private_trainer_class

    trained_captions = set()

    class Spy(private_trainer_class(tn.NetworkTrainer)):
        def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True):
            if is_train:
                trained_captions.update(batch["captions"])
            return super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                                         is_train=is_train)

    caplog.set_level(logging.WARNING, logger="smplora.kohya")
    args = parse(*kohya_args(data, tmp_path / "out", "--max_train_steps", "6", "--validation_split", "0.34",
                             "--privacy", "smplora", "--privacy_seed", "5", "--privacy_feature_grid", "4",
                             "--privacy_attacker_hidden", "8"))
    assert args.validation_seed is None
    trainer = Spy()
    trainer.train(args)
    assert args.validation_seed == 5
    sets = read_manifest(tmp_path / "out" / "lora_smplora_manifest.json")
    assert len(sets["nonmember"]) == 2 and len(sets["member"]) == 4
    carved = {Path(p).with_suffix(".caption").read_text() for p in sets["nonmember"]}
    assert trained_captions and not (carved & trained_captions)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "CARVED OUT" in capsys.readouterr().out and "validation_seed=5" in text


def test_resume_restores_attacker_state(data, tmp_path):
    out = tmp_path / "out"
    base = kohya_args(data, out, "--max_train_steps", "2", "--save_state")
    priv = ["--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"), "--privacy_feature_grid", "4",
            "--privacy_attacker_hidden", "8"]
    assert launch("train_network.py", *base, *priv) == 0
    from smplora_plugin import PrivacyRegularizer

    saved = PrivacyRegularizer.load(out / "lora-state" / "smplora_state.safetensors")
    assert saved.attacker_updates == 2
    # the final checkpoint's sidecar and the final state folder hold the same state: one file, two names
    sidecar, in_state = (out / "lora.smplora_state").stat(), (out / "lora-state" / "smplora_state.safetensors").stat()
    assert sidecar.st_ino == in_state.st_ino and sidecar.st_nlink == 2
    tn = standin()
    from smplora_plugin.integrations.kohya import make_private_trainer

    trainer = make_private_trainer(tn.NetworkTrainer)
    args = parse(*kohya_args(data, tmp_path / "out2", "--max_train_steps", "2", "--resume", str(out / "lora-state")),
                 *priv)
    trainer.train(args)
    reg = trainer.privacy_regularizer
    assert reg.attacker_updates == 4 and reg.global_step == 4      # continued from 2, not restarted
    # kohya's ss_steps restarts on --resume; the header says where the attacker's count resumed
    meta = header(tmp_path / "out2" / "lora.safetensors")
    assert meta["ss_steps"] == "2" and json.loads(meta["smplora.metrics"])["step"] == 4
    assert json.loads(meta["smplora.data"])["resumed_from_step"] == 2
    # a different config cannot silently continue an attacker
    trainer = make_private_trainer(tn.NetworkTrainer)
    args = parse(*kohya_args(data, tmp_path / "out3", "--resume", str(out / "lora-state")),
                 *priv[:-1], "16")
    from smplora_plugin.errors import StateError

    with pytest.raises(StateError, match="other privacy settings") as err:
        trainer.train(args)
    # the message names the kohya flag that differs, with the saved value and this run's
    assert "--privacy_attacker_hidden 8 (this run: --privacy_attacker_hidden 16)" in str(err.value)
    assert not (tmp_path / "out3").exists()         # refused before anything was written


def test_subclass_hooks_chain_and_main_block_fixups_run(data, tmp_path):
    rc = launch("sd3_train_network.py", *kohya_args(data, tmp_path / "out", "--max_train_steps", "2"),
                "--attn_mode", "sdpa", "--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"),
                "--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8")
    assert rc == 0
    calls = sys.modules["sd3_train_network"].CALLS
    assert ("on_step_start", True) in calls and ("on_step_start", False) in calls   # the non-member forward too
    assert ("process_batch", True) in calls and ("process_batch", False) in calls
    assert calls[-1] == ("attn_mode", "torch")      # the script's own main block ran
    assert "smplora.config" in header(tmp_path / "out" / "lora.safetensors")


def test_progress_bar_shows_attacker_metrics(data, tmp_path, capsys):
    rc = launch("train_network.py", *kohya_args(data, tmp_path / "out", "--max_train_steps", "2", "--progress"),
                "--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"), "--privacy_feature_grid", "4",
                "--privacy_attacker_hidden", "8")
    assert rc == 0
    err = capsys.readouterr().err
    assert "mia_acc=" in err and "mia_ce=" in err and "avr_loss=" in err


# ---------------------------------------------------------------------------- bad input, before training
@pytest.mark.parametrize("case", ["missing", "empty", "loose", "overlap"])
def test_bad_holdout_dir_fails_before_training(data, tmp_path, case, capsys):
    holdout = tmp_path / "bad_holdout"
    if case == "empty":
        holdout.mkdir()
    elif case == "loose":
        holdout.mkdir()
        _png(holdout / "x.png", 9)
    elif case == "overlap":
        make_folder(holdout, "1_thing", 2, 4, "holdout")
        shutil.copy(data / "train" / "2_thing" / "img_03.png", holdout / "1_thing" / "copy.png")
    tn = standin()
    calls = []
    original = tn.NetworkTrainer.load_target_model

    def load_target_model(self, *a, **kw):
        calls.append(1)
        return original(self, *a, **kw)

    tn.NetworkTrainer.load_target_model = load_target_model
    try:
        rc = launch("train_network.py", *kohya_args(data, tmp_path / "out"), "--privacy", "smplora",
                    "--privacy_holdout_dir", str(holdout))
    finally:
        tn.NetworkTrainer.load_target_model = original
    err = capsys.readouterr().err
    assert rc == 2 and not calls
    expected = {"missing": "does not exist", "empty": "holds no images", "loose": "move them into a subfolder",
                "overlap": "byte-identical"}[case]
    assert expected in err, err
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_no_nonmembers_is_a_clear_error(data, tmp_path, capsys):
    rc = launch("train_network.py", *kohya_args(data, tmp_path / "out"), "--privacy", "smplora")
    assert rc == 2
    err = capsys.readouterr().err
    assert "--privacy_holdout_dir" in err and "--validation_split" in err


def test_a_loop_that_never_hands_over_its_datasets_is_refused_at_the_first_step(data, tmp_path):
    """Members are learnt from the groups kohya passes to assert_extra_args: a train() that skips that hook is
    stopped before the first training step writes anything."""
    from smplora_plugin.errors import SmploraError
    from smplora_plugin.integrations.kohya import make_private_trainer

    tn = standin()

    class NoHandover(tn.NetworkTrainer):
        def _prepare_training(self, args):
            self.assert_extra_args = lambda *a: None   # shadows every class's hook, the mixin's included
            return super()._prepare_training(args)

        def process_batch(self, *a, **kw):
            raise AssertionError("a training step ran")

    trainer = make_private_trainer(NoHandover)
    out = tmp_path / "out"
    with pytest.raises(SmploraError, match="without calling assert_extra_args"):
        trainer.train(parse(*kohya_args(data, out), "--privacy", "smplora", "--privacy_holdout_dir",
                            str(data / "holdout")))
    assert not out.exists() or not any(out.iterdir())


def test_old_sd_scripts_is_refused_with_version(tmp_path, capsys):
    old = tmp_path / "sd-scripts-old"
    (old / "library").mkdir(parents=True)
    (old / "library" / "__init__.py").write_text("")
    (old / "train_network.py").write_text(
        "class NetworkTrainer:\n"
        "    def assert_extra_args(self, args, train_dataset_group):\n        pass\n"
        "    def get_text_cond(self, args, accelerator, batch, tokenizers, text_encoders, weight_dtype):\n"
        "        pass\n"
        "    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype):\n"
        "        pass\n"
        "    def train(self, args):\n        raise SystemExit('trained!')\n")
    from smplora_plugin.integrations.kohya.launcher import main

    rc = main(["--sd_scripts", str(old), "train_network.py", "--privacy", "smplora"])
    err = capsys.readouterr().err
    assert rc == 3 and "v0.10.0" in err and "process_batch" in err and "trained!" not in err
    sys.path.insert(0, str(old))
    import train_network as old_tn

    from smplora_plugin.integrations.kohya import KohyaVersionError, make_private_trainer

    with pytest.raises(KohyaVersionError, match="v0.10.0"):
        make_private_trainer(old_tn.NetworkTrainer, {"alpha": 0.1})


def test_launcher_cannot_find_sd_scripts(tmp_path, capsys, monkeypatch):
    from smplora_plugin.integrations.kohya.launcher import main

    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train_network.py", "--privacy", "smplora"]) == 2
    assert "not an sd-scripts checkout" in capsys.readouterr().err
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(STANDIN))
    assert main(["no_such_train_network.py"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([]) == 2 and "usage: smplora-kohya" in capsys.readouterr().err


def test_python_m_entry_point_and_help(tmp_path):
    env = {**os.environ, "SD_SCRIPTS_DIR": str(STANDIN)}
    proc = subprocess.run([sys.executable, "-m", "smplora_plugin.integrations.kohya", "train_network.py", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--privacy_holdout_dir" in proc.stdout and "--train_data_dir" in proc.stdout
    assert "{none,smplora,mplora,dpsgd}" in proc.stdout


@pytest.mark.slow
def test_two_process_accelerate_launch_keeps_ranks_in_step(data, tmp_path):
    """accelerate launch -m with 2 CPU processes (gloo): reg-only batches on one rank must not hang the others."""
    pytest.importorskip("accelerate")
    make_folder(data / "reg", "1_class", 3, 2, "reg")   # more reg images: some batches hold only those
    out = tmp_path / "out"
    env = {**os.environ, "SD_SCRIPTS_DIR": str(STANDIN), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "smplora_plugin.integrations.kohya",
           "train_network.py", *kohya_args(data, out, "--reg_data_dir", str(data / "reg"), "--max_train_steps", "6",
                                           "--train_batch_size", "1", "--save_state"),
           "--privacy", "smplora", "--privacy_holdout_dir", str(data / "holdout"), "--privacy_feature_grid", "4",
           "--privacy_attacker_hidden", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = header(out / "lora.safetensors")
    metrics, info = json.loads(meta["smplora.metrics"]), json.loads(meta["smplora.data"])
    # every optimiser step either updated the attacker on all ranks or skipped the privacy term on all ranks
    assert metrics["attacker_updates"] + info["reg_only_batches"] == 6
    assert (out / "lora-state" / "smplora_state.safetensors").is_file()
