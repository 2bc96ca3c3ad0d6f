"""The second demo data set (procedural textured shapes) and the demo's data-set switch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

from smplora_plugin.demo import textures  # noqa: E402
from smplora_plugin.demo.datasets import NAMES, get_dataset  # noqa: E402
from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig  # noqa: E402
from smplora_plugin.demo.pipeline import DemoConfig, load_assets  # noqa: E402


def test_pool_is_deterministic_and_instance_specific():
    a, b, c = textures.make_pool(30, 5), textures.make_pool(30, 5), textures.make_pool(30, 6)
    assert a.images.shape == (30, 1, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.images, b.images) and a.ids == b.ids
    assert len(set(a.ids)) == 30 and not set(a.ids) & set(c.ids)
    assert a.captions == [textures.caption_for(int(y)) for y in a.labels]
    # same class, different instances: the images differ (instance detail beyond the caption)
    same = (a.labels == a.labels[0]).nonzero().flatten()
    assert len(same) >= 2 and not torch.equal(a.images[same[0]], a.images[same[1]])


def test_captions_cover_ten_classes_within_the_vocabulary():
    caps = [textures.caption_for(i) for i in range(10)]
    assert len(set(caps)) == 10
    assert all(w in textures.VOCAB for cap in caps for w in cap.split())
    with pytest.raises(ValueError, match="0..9"):
        textures.caption_for(10)


def test_splits_are_disjoint_and_checked():
    s = textures.make_splits({"member": 20, "nonmember_eval": 30}, seed=1)
    ids = s["member"].ids + s["nonmember_eval"].ids
    assert len(ids) == len(set(ids)) == 50
    assert not set(ids) & set(s.public.ids)
    assert s["member"].captions[0] == textures.caption_for(int(s["member"].labels[0]))
    other = textures.make_splits({"member": 20, "nonmember_eval": 30}, seed=2)
    assert other["member"].ids != s["member"].ids
    with pytest.raises(ValueError, match="private pool holds 500"):
        textures.make_splits({"member": 400, "nonmember_eval": 200})
    with pytest.raises(ValueError, match="unknown set"):
        textures.make_splits({"members": 3})


def test_dataset_registry_and_config():
    assert set(NAMES) == {"digits", "textures", "emoji"}
    with pytest.raises(ValueError, match="choose one of"):
        get_dataset("cifar")
    with pytest.raises(ValueError, match="dataset='cifar' is unknown"):
        DemoConfig(dataset="cifar").validate()
    tex = get_dataset("textures").model_config
    assert tex.latent_size == 8 and tex.fingerprint() != TinyLDMConfig().fingerprint()
    model = TinyLDM(tex, seed=0)
    ids = model.text.tokenize(["a dotted ring"])
    assert (ids[0, :3] > 1).all()  # every word known, none mapped to <unk>
    z = model.encode(torch.zeros(2, 1, 16, 16))
    assert model.predict(z, torch.tensor([1, 999]), ["a striped cross", ""]).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_assets_load_for_each_dataset(name):
    loaded = load_assets(DemoConfig(dataset=name))
    assert loaded is not None, \
        f"shipped {name} weights missing or stale: python -m smplora_plugin.demo.make_assets --dataset {name}"
    model, clf = loaded
    assert model.cfg == get_dataset(name).model_config
    s = get_dataset(name).splits({"nonmember_eval": 100}, 0)["nonmember_eval"]
    acc = float((clf(s.images).argmax(1) == s.labels).float().mean())
    assert acc > 0.8  # the classifier behind the utility metric recognises real private-pool images


@pytest.mark.slow
def test_demo_pipeline_on_textures(tmp_path):
    from smplora_plugin.demo.pipeline import run_demo

    # the data set's path through the demo (tests/test_demo_cli.py runs every attack and column on digits)
    cfg = DemoConfig.quick(dataset="textures", steps=120, variants=("plain", "smp-robust"),
                           attacks=("loss", "loss_calibrated", "quantile"))
    run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["dataset"] == "textures" and summary["base"].startswith("shipped weights")
    assert "(textures)" in (tmp_path / "summary.md").read_text()
    rep = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert "textured shapes" in rep["info"]["model"]
    assert summary["variants"]["plain"]["heldout_loss"] > 0
    assert 0.0 <= summary["variants"]["smp-robust"]["classifier_accuracy"] <= 1.0


def test_demo_cli_refuses_an_unknown_dataset(capsys):
    from smplora_plugin.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--dataset", "cifar", "--quick"])
    assert exc.value.code == 2
    assert "textures" in capsys.readouterr().err  # the choices are listed
