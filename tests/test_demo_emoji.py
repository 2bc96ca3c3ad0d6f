"""The emoji data set (Noto base, Twemoji LoRA): shipped arrays, fixed pools, seeded member draws,
the style utility, and the demo's pipeline on emoji end to end (at the quick size, plain LoRA only, a few attacks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from smplora_plugin.demo import emoji  # noqa: E402
from smplora_plugin.demo.datasets import get_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_emoji_dataset", ROOT / "scripts/emoji/make_emoji_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_arrays_are_aligned_and_documented():
    t = emoji.table()
    n = len(t["emoji"])
    assert n == t["selection"]["counts"]["kept"] > 1400
    for r in emoji.RESOLUTIONS:
        arr = emoji._arrays(r)
        assert set(arr) == set(emoji.STYLES)
        assert all(a.shape == (n, r, r, 3) and a.dtype == np.uint8 for a in arr.values())
        assert not np.array_equal(arr["twitter"], arr["google"])
        assert (arr["twitter"][:, 0, 0] == 255).all(axis=-1).mean() > 0.75  # on white (square emoji fill the corner)
    for style in emoji.STYLES:
        pkg = t["packages"][style]
        assert pkg["version"] == "16.0.0" and len(pkg["sha512"]) == 128 and len(pkg["sha1"]) == 40
    assert t["command"].startswith("python scripts/emoji/make_emoji_dataset.py")
    assert (emoji.DATA_DIR / "ATTRIBUTION.md").is_file() and (emoji.DATA_DIR / "LICENSE-Apache-2.0.txt").is_file()
    assert sum(f.stat().st_size for f in emoji.DATA_DIR.iterdir()) < 15e6
    caps = emoji.captions()
    assert len(set(caps)) == n and all(c == c.lower() and c.split() for c in caps)
    assert not any(r["category"] in ("Flags", "Component") for r in t["emoji"])


def test_variant_groups_merge_gender_and_one_emoji_per_group():
    mod = _script()
    assert mod.variant_group("1F468-200D-1F4BB") == mod.variant_group("1F469-200D-1F4BB") \
        == mod.variant_group("1F9D1-200D-1F4BB")  # man / woman / person technologist
    assert mod.variant_group("1F46E-200D-2642-FE0F") == mod.variant_group("1F46E")  # police officer
    assert mod.variant_group("1F408") != mod.variant_group("1F408-200D-2B1B")  # cat / black cat stay apart
    groups = [r["group"] for r in emoji.table()["emoji"]]
    assert len(groups) == len(set(groups))
    assert mod.caption({"subcategory": "animal-mammal", "name": "WATER BUFFALO"}) == "animal mammal water buffalo"


def test_pools_are_fixed_and_disjoint():
    p = emoji.pools()
    assert len(p["classifier"]) == emoji.CLASSIFIER_POOL
    assert len(p["candidates"]) == len(emoji.table()["emoji"]) - emoji.CLASSIFIER_POOL >= 2 * 512 + 200
    assert not set(p["classifier"]) & set(p["candidates"])
    base, cand = emoji.load_emoji("base"), emoji.load_emoji("candidates")
    clf = emoji.load_emoji("classifier")
    assert base.images.shape == (len(p["candidates"]), 3, 16, 16) and base.images.min() >= -1
    assert [i.split(":")[1] for i in base.ids] == [i.split(":")[1] for i in cand.ids]  # same emoji, other style
    assert base.captions == cand.captions and (base.labels == 0).all() and (cand.labels == 1).all()
    concepts = lambda s: {i.split(":")[1] for i in s.ids}  # noqa: E731
    assert not concepts(clf) & concepts(cand)
    assert sorted(clf.labels.tolist()) == [0] * 200 + [1] * 200
    assert emoji.load_emoji("candidates", 32).images.shape[-1] == 32
    with pytest.raises(ValueError, match="choose one of"):
        emoji.load_emoji("train")
    with pytest.raises(ValueError, match="resolution must be one of"):
        emoji.load_emoji("base", 24)


def test_member_draws_are_seeded_nested_and_disjoint():
    draws = {m: emoji.draw_members(m, seed=3) for m in emoji.MEMBER_COUNTS}
    for m, d in draws.items():
        mem, non = d["member"].ids, d["nonmember_eval"].ids
        assert len(mem) == len(non) == m and not set(mem) & set(non)
        assert all(i.startswith("emoji-twitter:") for i in mem + non)
    assert set(draws[32]["member"].ids) <= set(draws[128]["member"].ids) <= set(draws[512]["member"].ids)
    again, other = emoji.draw_members(128, seed=3), emoji.draw_members(128, seed=4)
    assert again["member"].ids == draws[128]["member"].ids and other["member"].ids != draws[128]["member"].ids
    d = emoji.draw_members(512, seed=0, defense=200)
    assert len(set(d["member"].ids) | set(d["nonmember_eval"].ids) | set(d["nonmember_defense"].ids)) == 1224
    with pytest.raises(ValueError, match="private pool holds 1243"):
        emoji.draw_members(512, seed=0, defense=300)


def test_kernel_distance():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), rng.normal(1.0, 1.0, size=(200, 8))
    assert abs(emoji.kernel_distance(a, b)) < 0.5 * emoji.kernel_distance(a, c)
    with pytest.raises(ValueError, match="feature arrays"):
        emoji.kernel_distance(a, c[:, :4])


def test_model_and_vocab_fit_the_captions():
    ds = get_dataset("emoji")
    cfg = ds.model_config
    assert cfg.image_channels == 3 and cfg.latent_channels == 12 and cfg.latent_size == 8
    from smplora_plugin.demo.model import TinyLDM

    model = TinyLDM(cfg, seed=0)
    ids = model.text.tokenize(emoji.captions()[:50])
    assert (ids > 0).sum(1).min() >= 2 and (ids != 1).all()  # no caption word maps to <unk>
    z = model.encode(emoji.load_rows([0, 1], "twitter").images)
    assert z.shape == (2, 12, 8, 8) and torch.equal(model.decode(z), emoji.load_rows([0, 1], "twitter").images)
    with pytest.raises(ValueError, match="3-channel"):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_shipped_style_classifier_tells_the_styles_apart():
    loaded = emoji.load_base_model()
    assert loaded is not None, "python -m smplora_plugin.demo.make_assets --dataset emoji"
    model, clf = loaded
    # candidate emoji: never seen by the classifier, in either style
    tw, go = emoji.load_emoji("candidates"), emoji.load_emoji("base")
    assert emoji.style_share(clf, tw.images) > 0.75 and emoji.style_share(clf, go.images) < 0.35


#: the data set's path through the demo, not the whole suite (tests/test_demo_cli.py runs every attack and
#: column on digits): the generation attack alone is half of a full emoji audit
CHEAP_ATTACKS = ("loss", "loss_calibrated", "quantile", "sima")


@pytest.mark.slow
def test_demo_pipeline_on_emoji(tmp_path):
    from smplora_plugin.demo.pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(dataset="emoji", variants=("plain",), attacks=CHEAP_ATTACKS)
    run_demo(cfg, tmp_path, progress=False, log=lambda *a: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["dataset"] == "emoji" and summary["base"].startswith("shipped weights")
    table = (tmp_path / "summary.md").read_text()
    assert "(emoji)" in table and "style share (LoRA's style) at unseen captions" in table
    verdict = next(ln for ln in table.splitlines() if ln.startswith("| **verdict**"))
    assert verdict.count("**") >= 4 and "n/a" not in verdict  # the base model's column and plain LoRA's
    assert set(json.loads((tmp_path / "plain" / "report.json").read_text())["attacks"]) == set(CHEAP_ATTACKS)
    plain = summary["variants"]["plain"]
    assert plain["style_gain_members"] > 0.1  # plain LoRA learns the Twemoji style at its members' captions
    base = summary["base_model_quality"]
    assert plain["style_share_members"] > base["style_share_members"]
    assert plain["kernel_distance"] is not None and plain["heldout_loss"] > 0
