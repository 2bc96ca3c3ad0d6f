"""`smplora audit` end to end on a tiny diffusers pipeline, LoRA formats, and its error messages."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin import cli  # noqa: E402

from _helpers import lora_state as _lora_state  # noqa: E402
from _helpers import to_kohya as _to_kohya  # noqa: E402

FAST = json.dumps({"timesteps": [100, 300], "sima_timesteps": [10], "pia_timesteps": [200], "secmi_t": [100],
                   "clid_timesteps": [450], "n_boot": 200, "mlp_max_epochs": 30})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images

    root = tmp_path_factory.mktemp("audit_cli")
    base = save_tiny_pipeline(root / "base")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    state = _lora_state(unet)
    StableDiffusionPipeline.save_lora_weights(str(root / "lora"), unet_lora_layers=state)
    save_file(_to_kohya(state), str(root / "kohya.safetensors"))
    te_state = dict(state)
    from transformers import CLIPTextModel

    g = torch.Generator().manual_seed(1)
    te = CLIPTextModel.from_pretrained(base / "text_encoder")
    for name, mod in te.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            te_state[f"text_encoder.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.1
            te_state[f"text_encoder.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.5
    save_file({("unet." + k if not k.startswith("text_encoder.") else k): v for k, v in te_state.items()},
              str(root / "with_te.safetensors"))
    write_digit_images(root / "members", n=10, start=0)
    write_digit_images(root / "nonmembers", n=10, start=10)
    return {"root": root, "base": base, "lora": root / "lora" / "pytorch_lora_weights.safetensors",
            "kohya": root / "kohya.safetensors", "with_te": root / "with_te.safetensors", "members": root / "members",
            "nonmembers": root / "nonmembers"}


def _args(ws, out, **over):
    a = {"--base-model": ws["base"], "--lora": ws["lora"], "--members": ws["members"],
         "--nonmembers": ws["nonmembers"], "--out": out, "--draws": 1, "--config": FAST}
    a.update(over)
    argv = ["audit", "--no-progress", "--threads", "1"]
    for k, v in a.items():
        if v is not None:
            argv += [k, str(v)]
    return argv


def test_audit_end_to_end(workspace, tmp_path, capsys):
    rc = cli.main(_args(workspace, tmp_path / "out"))
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("report.json", "report.md", "roc.png", "manifest.json"):
        assert (tmp_path / "out" / name).is_file(), name
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["splits"] == {"member_calibration": 5, "nonmember_calibration": 5, "member_eval": 5, "nonmember_eval": 5}
    assert {"loss", "loss_calibrated", "secmi", "pia", "sima", "clid", "clid_vec", "mlp", "logreg", "gboost",
            "blind"} <= set(rep["attacks"])
    for r in rep["attacks"].values():
        assert 0.0 <= r["auc"] <= 1.0 and r["tpr_at_1pct_fpr"] is None  # 5 non-members: n/a
    assert "| attack | AUC [95% CI]" in out and "max over attacks" in out
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ids = [e["id"] for entries in man["sets"].values() for e in entries]
    assert len(ids) == len(set(ids)) == 20 and all(Path(i).is_file() for i in ids)


def test_kohya_and_diffusers_formats_give_the_same_model(workspace):
    from smplora_plugin.audit import load_lora_target

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_formats(workspace, load_lora_target)
    finally:
        torch.set_num_threads(threads)


def _check_formats(workspace, load_lora_target):
    a = load_lora_target(workspace["base"], workspace["lora"])
    b = load_lora_target(workspace["base"], workspace["kohya"])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 200)
    c = a.condition(["a handwritten digit 3", ""])
    ea, eb = a.eps(z, t, c), b.eps(z, t, c)
    assert torch.allclose(ea, eb, atol=1e-5)
    base = a.eps(z, t, c, adapter=False)
    assert (ea - base).abs().max() > 1e-3  # the adapter changes the model ...
    assert torch.allclose(a.eps(z, t, c), ea)  # ... and is switched back on after a base query


def test_text_encoder_lora_is_switched_off_for_the_base_model(workspace):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from smplora_plugin.audit import load_lora_target

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = load_lora_target(workspace["base"], workspace["with_te"])
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.full((2,), 200)
        c = a.condition(["a handwritten digit 3", "two"])
        hidden_on = a._encode_text(c)
        base = a.eps(z, t, c, adapter=False)
        te0 = CLIPTextModel.from_pretrained(workspace["base"] / "text_encoder")
        u0 = UNet2DConditionModel.from_pretrained(workspace["base"], subfolder="unet")
        tok = a.tokenizer(c, padding="max_length", truncation=True, max_length=a.tokenizer.model_max_length,
                          return_tensors="pt")
        with torch.no_grad():
            hidden_base = te0(tok.input_ids)[0]
            ref = u0(z, t, encoder_hidden_states=hidden_base).sample
        assert torch.allclose(base, ref, atol=1e-5)  # base = untouched UNet AND text encoder
        assert (hidden_on - hidden_base).abs().max() > 1e-2  # the text-encoder LoRA is active otherwise
        assert torch.allclose(a._encode_text(c), hidden_on)
    finally:
        torch.set_num_threads(threads)


def test_audit_from_manifest_with_explicit_splits(workspace, tmp_path):
    from smplora_plugin.holdout import write_manifest

    m = sorted(workspace["members"].glob("*.png"))
    n = sorted(workspace["nonmembers"].glob("*.png"))
    man = write_manifest(tmp_path / "m.json", {"member_calibration": m[:5], "member_eval": m[5:],
                                               "nonmember_calibration": n[:5], "nonmember_eval": n[5:]}, seed=0)
    rc = cli.main(_args(workspace, tmp_path / "out", **{"--members": None, "--nonmembers": None,
                                                       "--manifest": man, "--attacks": "loss,loss_calibrated"}))
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["attacks"]) == {"loss", "loss_calibrated"}


def _err(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    return err


def test_flip_average_flag(workspace, tmp_path):
    args = _args(workspace, tmp_path / "flip", **{"--attacks": "loss,loss_calibrated"})
    assert cli.main(args + ["--flip-average"]) == 0
    assert cli.main(_args(workspace, tmp_path / "plain", **{"--attacks": "loss,loss_calibrated"})) == 0
    flip = json.loads((tmp_path / "flip" / "report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert flip["config"]["flip_average"] is True and plain["config"]["flip_average"] is False
    # 2 timesteps x 1 draw, adapter and base; twice with the mirror
    assert plain["model_passes_per_sample"]["loss"] == 4 and flip["model_passes_per_sample"]["loss"] == 8
    assert flip["utility"]["heldout_denoising_loss"] != plain["utility"]["heldout_denoising_loss"]


def test_audit_without_captions_uses_the_null_condition(workspace, tmp_path):
    rc = cli.main(_args(workspace, tmp_path / "out", **{"--attacks": "loss,sima,blind"}) + ["--no-captions"])
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["attacks"]) == {"loss", "sima", "blind"}


def test_missing_files_are_clear_errors(workspace, tmp_path, capsys):
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--lora": tmp_path / "nope.safetensors"}))
    assert "nope.safetensors does not exist" in err
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--base-model": tmp_path / "nobase"}))
    assert "nobase" in err and "does not exist" in err
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--members": tmp_path / "nodir"}))
    assert "nodir" in err and "folder does not exist" in err
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--nonmembers": None}))
    assert "--nonmembers" in err
    assert not (tmp_path / "o").exists()


def test_audit_pooled_runs_end_to_end(workspace, tmp_path, capsys):
    """Two (LoRA, manifest) pairs: the pooled report first, then one folder per run."""
    m = sorted(str(p) for p in workspace["members"].glob("*.png"))
    n = sorted(str(p) for p in workspace["nonmembers"].glob("*.png"))
    for name, (mem, non) in {"m1.json": (m, n), "m2.json": (n, m)}.items():
        doc = {"format": "smplora-holdout-manifest/1", "seed": 0,
               "sets": {"member": [{"id": p} for p in mem], "nonmember": [{"id": p} for p in non]}}
        (tmp_path / name).write_text(json.dumps(doc))
    out = tmp_path / "pooled"
    argv = ["audit", "--no-progress", "--threads", "1", "--base-model", str(workspace["base"]), "--out", str(out),
            "--draws", "1", "--config", FAST, "--attacks", "loss,loss_calibrated,blind",
            "--run", f"{workspace['lora']}={tmp_path / 'm1.json'}", "--run",
            f"{workspace['kohya']}={tmp_path / 'm2.json'}"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Membership-inference audit pooled over 2 LoRAs") and "**Verdict: " in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["pooling"]["runs"] == ["pytorch_lora_weights", "kohya"]
    assert rep["splits"]["member_eval"] == 10 and rep["verdict"]["verdict"] is not None
    for sub in ("run_01_pytorch_lora_weights", "run_02_kohya"):
        for f in ("report.json", "report.md", "roc.png", "manifest.json"):
            assert (out / sub / f).is_file(), (sub, f)
    err = _err(capsys, argv + ["--lora", str(workspace["lora"])])
    assert "--run replaces" in err
    err = _err(capsys, argv[:-4] + ["--run", "nofile.safetensors"])
    assert "LORA_FILE=MANIFEST_FILE" in err


def test_help_lists_every_written_file(capsys):
    with pytest.raises(SystemExit):
        cli.main(["audit", "--help"])
    text = capsys.readouterr().out
    for f in ("report.md", "report.json", "roc.png", "per_timestep_auc.png", "manifest.json", "run_NN_<name>"):
        assert f in text, f


def test_unreadable_image_is_named(workspace, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(workspace["nonmembers"], bad)
    (bad / "broken.png").write_bytes(b"this is not a png")
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--nonmembers": bad}))
    assert "broken.png" in err and "cannot read image" in err


def test_overlapping_manifest_is_refused(workspace, tmp_path, capsys):
    m = sorted(str(p) for p in workspace["members"].glob("*.png"))
    doc = {"format": "smplora-holdout-manifest/1", "seed": 0,
           "sets": {"member": [{"id": p} for p in m], "nonmember": [{"id": m[0]}]}}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--members": None, "--nonmembers": None,
                                                          "--manifest": tmp_path / "m.json"}))
    assert "both" in err and m[0] in err


def test_too_few_samples(workspace, tmp_path, capsys):
    from smplora_plugin.tiny_sd import write_digit_images

    write_digit_images(tmp_path / "few", n=4, start=30)
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--nonmembers": tmp_path / "few"}))
    assert "at least 4 are needed" in err


def test_bad_config_and_attack_names(workspace, tmp_path, capsys):
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--config": '{"timestepz": [1]}'}))
    assert "timestepz" in err
    err = _err(capsys, _args(workspace, tmp_path / "o", **{"--attacks": "loss,nosuch"}))
    assert "unknown attack 'nosuch'" in err


def test_list_attacks(capsys):
    assert cli.main(["audit", "--list-attacks"]) == 0
    out = capsys.readouterr().out
    assert "secmi" in out and "clid" in out and "blind" in out


def test_demo_without_module_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_demo_module", lambda: (None, ImportError("No module named 'smplora_plugin.demo.cli'")))
    err = _err(capsys, ["demo"])
    assert "smplora demo" in err and "not available" in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "audit" in capsys.readouterr().out


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_diffusers_target_on_a_live_unet_leaves_it_trainable(workspace, one_thread):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from smplora_plugin.audit import DiffusersTarget
    from smplora_plugin.tiny_sd import build_tokenizer

    unet = UNet2DConditionModel.from_pretrained(workspace["base"], subfolder="unet")
    _lora_state(unet, seed=3)
    unet.train()
    te = CLIPTextModel.from_pretrained(workspace["base"] / "text_encoder")
    sched = DDPMScheduler.from_pretrained(workspace["base"], subfolder="scheduler")
    target = DiffusersTarget(unet, sched, text_encoder=te, tokenizer=build_tokenizer())
    lora = {n: p.requires_grad for n, p in unet.named_parameters() if "lora" in n}
    assert lora and all(lora.values())
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = target.condition(["a handwritten digit 1", ""])
    t = torch.full((2,), 50)
    on1, off, on2 = target.eps(z, t, c), target.eps(z, t, c, adapter=False), target.eps(z, t, c)
    assert torch.equal(on1, on2) and (on1 - off).abs().max() > 1e-3
    assert {n: p.requires_grad for n, p in unet.named_parameters() if "lora" in n} == lora
