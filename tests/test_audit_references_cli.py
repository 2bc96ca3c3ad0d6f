"""`smplora audit --reference LORA=MANIFEST` end to end on a tiny diffusers pipeline, and its errors."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin import cli  # noqa: E402

from _helpers import lora_state  # noqa: E402

FAST = json.dumps({"timesteps": [100, 300], "n_boot": 100})
ATTACKS = "loss,lira_online,lira_offline,rmia"


def _lora_file(base, path, seed, rank=4):
    """A LoRA on the tiny UNet's attention with seeded random up-weights, saved in diffusers format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=lora_state(unet, seed, rank),
                                              weight_name="lora.safetensors")
    return path / "lora.safetensors"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from smplora_plugin.audit.references import balanced_halves
    from smplora_plugin.holdout import write_manifest
    from smplora_plugin.tiny_sd import save_tiny_pipeline, write_digit_images

    root = tmp_path_factory.mktemp("audit_refs")
    base = save_tiny_pipeline(root / "base")
    write_digit_images(root / "members", n=8, start=0)
    write_digit_images(root / "nonmembers", n=8, start=8)
    images = sorted((root / "members").glob("*.png")) + sorted((root / "nonmembers").glob("*.png"))
    keep = balanced_halves(len(images), 4, seed=0)
    refs = []
    for r in range(4):
        lora = _lora_file(base, root / f"ref{r}", seed=r + 1)
        man = write_manifest(root / f"ref{r}" / "manifest.json",
                             {"member": [p for p, k in zip(images, keep[r]) if k]})
        refs.append(f"{lora}={man}")
    return {"root": root, "base": base, "target": _lora_file(base, root / "target", seed=0),
            "members": root / "members", "nonmembers": root / "nonmembers", "refs": refs, "images": images}


def _argv(ws, out, refs, *extra):
    argv = ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws["base"]), "--lora", str(ws["target"]),
            "--members", str(ws["members"]), "--nonmembers", str(ws["nonmembers"]), "--out", str(out),
            "--draws", "1", "--config", FAST, "--no-captions", *extra]
    for r in refs:
        argv += ["--reference", r]
    return argv


def test_reference_attacks_end_to_end(ws, tmp_path):
    rc = cli.main(_argv(ws, tmp_path / "out", ws["refs"], "--attacks", ATTACKS))
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["attacks"]) == set(ATTACKS.split(","))
    info = rep["info"]["references"]
    assert info["count"] == 4 and info["mode"] == "online"
    assert info["in_per_sample_min_mean_max"] == [2, 2.0, 2]  # matched by path / pixels to the audited images
    assert rep["attacks"]["rmia"]["calibration"]["variant"] == "online"
    for a in ("lira_online", "lira_offline", "rmia"):
        assert 0.0 <= rep["attacks"][a]["auc"] <= 1.0


def test_offline_mode_is_honoured(ws, tmp_path):
    rc = cli.main(_argv(ws, tmp_path / "out", ws["refs"], "--attacks", "loss,lira_offline",
                        "--reference-mode", "offline"))
    assert rc == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["info"]["references"]["mode"] == "offline"


def _err(capsys, argv, out):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists()  # nothing written
    return err


def test_reference_errors_before_any_file(ws, tmp_path, capsys):
    from smplora_plugin.holdout import write_manifest

    out = tmp_path / "out"
    lora0, man0 = ws["refs"][0].rsplit("=", 1)
    # a manifest naming an image that does not exist
    ghost = write_manifest(tmp_path / "ghost.json", {"member": [str(ws["images"][0]), str(tmp_path / "ghost.png")]})
    err = _err(capsys, _argv(ws, out, [ws["refs"][1], f"{lora0}={ghost}"]), out)
    assert "ghost.png" in err and "do not exist" in err
    # a manifest without a 'member' set
    wrong = write_manifest(tmp_path / "wrong.json", {"train": [str(ws["images"][0])]})
    err = _err(capsys, _argv(ws, out, [ws["refs"][1], f"{lora0}={wrong}"]), out)
    assert "'member' set" in err
    # a reference LoRA of another shape (rank 2 instead of 4: not trained the audited way)
    other = _lora_file(ws["base"], tmp_path / "rank2", seed=9, rank=2)
    err = _err(capsys, _argv(ws, out, [ws["refs"][1], f"{other}={man0}"]), out)
    assert "does not match the audited LoRA" in err
    # too few references, a malformed spec, a missing LoRA file
    err = _err(capsys, _argv(ws, out, ws["refs"][:1]), out)
    assert "at least 2" in err
    err = _err(capsys, _argv(ws, out, [ws["refs"][1], "just-a-file.safetensors"]), out)
    assert "LORA=MANIFEST" in err
    err = _err(capsys, _argv(ws, out, [ws["refs"][1], f"{tmp_path / 'nope.safetensors'}={man0}"]), out)
    assert "nope.safetensors does not exist" in err
    # online requested, but the audited images are in no reference's training set
    only_other = write_manifest(tmp_path / "other.json", {"member": [str(ws["images"][0])]})
    err = _err(capsys, _argv(ws, out, [f"{lora0}={only_other}", f"{lora0}={only_other}"],
                             "--reference-mode", "online"), out)
    assert "in no reference's training set" in err
