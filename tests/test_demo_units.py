"""Unit tests of the demo's parts: splits, autoencoder, LoRA switch, target, quality metrics, assets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

from smplora_plugin.demo.data import PRIVATE_POOL, make_splits  # noqa: E402
from smplora_plugin.demo.model import (  # noqa: E402
    CaptionEncoder,
    PixelUnshuffleAE,
    TinyLDM,
    TinyLDMConfig,
    caption_for,
    load_base,
    save_base,
)
from smplora_plugin.demo.quality import frechet_distance  # noqa: E402

SIZES = {"member": 16, "nonmember_defense": 8, "nonmember_calibration": 8, "nonmember_eval": 8}


def test_splits_disjoint_deterministic_and_public_pool_fixed():
    a = make_splits(SIZES, seed=0)
    b = make_splits(SIZES, seed=0)
    c = make_splits(SIZES, seed=1)
    assert {k: v.ids for k, v in a.sets.items()} == {k: v.ids for k, v in b.sets.items()}
    assert a["member"].ids != c["member"].ids
    assert a.public.ids == c.public.ids  # the base model's pool never depends on the private seed
    seen = set(a.public.ids)
    for name, s in a.sets.items():
        assert len(s) == SIZES[name]
        assert not seen & set(s.ids), name
        seen |= set(s.ids)
    assert len(a.public) == 1797 - PRIVATE_POOL
    x = a["member"].images
    assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert a["member"].captions[0] == caption_for(int(a["member"].labels[0]))


@pytest.mark.parametrize("sizes, msg", [({"member": PRIVATE_POOL + 1}, "private pool"),
                                        ({"members": 3}, "unknown set"), ({"member": 0}, ">= 1")])
def test_split_bad_sizes(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        make_splits(sizes, seed=0)


def test_autoencoder_is_exact():
    ae = PixelUnshuffleAE()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (5, 4, 4, 4)
    assert torch.equal(ae.decode(z), x)
    with pytest.raises(ValueError, match="grey images"):
        ae.encode(torch.zeros(2, 3, 8, 8))


def test_caption_encoder_null_and_unknown_words():
    enc = CaptionEncoder(dim=8, max_words=6)
    ids = enc.tokenize(["a handwritten digit 3", "", "a blurry digit"])
    assert ids[0].tolist()[:4] == [enc.index["a"], enc.index["handwritten"], enc.index["digit"], enc.index["3"]]
    assert ids[1].eq(0).all()
    assert ids[2, 1].item() == enc.index["<unk>"]
    assert enc(["a handwritten digit 3"]).shape == (1, 6, 8)


def _lora_model():
    m = TinyLDM(TinyLDMConfig(), seed=0)
    m.add_lora(4, seed=0)
    with torch.no_grad():  # make the adapter do something (peft initialises B to zero)
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return m.eval()


def test_adapter_switch_gives_the_base_model():
    from smplora_plugin.audit.target import check_target
    from smplora_plugin.demo.target import TinyLDMTarget

    m = _lora_model()
    base = TinyLDM(TinyLDMConfig(), seed=0).eval()
    tgt = TinyLDMTarget(m)
    check_target(tgt)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    z = tgt.encode(x)
    cond = tgt.condition([caption_for(1), "", caption_for(7)])
    t = torch.tensor([10, 200, 900])
    with torch.no_grad():
        e_base = base.predict(z, t, cond)
    e_off = tgt.eps(z, t, cond, adapter=False)
    e_on = tgt.eps(z, t, cond, adapter=True)
    assert torch.allclose(e_off, e_base, atol=1e-5)
    assert (e_on - e_off).abs().max() > 1e-3
    assert torch.allclose(tgt.eps(z, t, cond, adapter=True), e_on)  # adapter is back on afterwards
    with pytest.raises(ValueError, match="LoRA"):
        TinyLDMTarget(TinyLDM(TinyLDMConfig(), seed=0))


def test_base_weights_roundtrip_and_fingerprint(tmp_path):
    m = TinyLDM(TinyLDMConfig(), seed=3)
    path = tmp_path / "base.safetensors"
    save_base(m, path)
    back = load_base(path, TinyLDMConfig())
    assert back is not None
    for (k, v), (k2, v2) in zip(m.base_state_dict().items(), back.base_state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert load_base(path, TinyLDMConfig(block_out_channels=(16, 32))) is None  # another model: not loaded
    assert load_base(tmp_path / "missing.safetensors") is None


def test_lora_state_roundtrip():
    m = _lora_model()
    sd = m.lora_state_dict()
    assert sd and all("lora_" in k for k in sd)
    m2 = TinyLDM(TinyLDMConfig(), seed=0)
    m2.add_lora(4, seed=1)
    m2.load_lora_state_dict(sd)
    z, t, c = torch.randn(2, 4, 4, 4), torch.tensor([5, 500]), [caption_for(2), caption_for(3)]
    with torch.no_grad():
        assert torch.allclose(m.eval().predict(z, t, c), m2.eval().predict(z, t, c), atol=1e-6)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(1, 4 I) in 3-d: |mu|^2 + tr(I + 4I - 2*2I) = 3 + 3
    b = rng.normal(size=(4000, 3)) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    with pytest.raises(ValueError, match="feature arrays"):
        frechet_distance(a, b[:, :2])


def test_demo_config_validation():
    from smplora_plugin.demo.pipeline import DemoConfig

    DemoConfig().validate()
    DemoConfig.quick().validate()
    with pytest.raises(ValueError, match="members"):
        DemoConfig(members=4).validate()
    with pytest.raises(ValueError, match="variants"):
        DemoConfig(variants=("smp",)).validate()
    with pytest.raises(ValueError, match="lora_lr"):
        DemoConfig(lora_lr=0.0).validate()


def test_shipped_assets_match_the_demo():
    """The committed weights load (so `smplora demo` does not retrain the base) and stay small."""
    from smplora_plugin.demo.pipeline import ASSETS, DemoConfig, load_assets

    files = list(ASSETS.glob("*.safetensors"))
    assert files, "run: python -m smplora_plugin.demo.make_assets"
    # three data sets' base + classifier (the emoji arrays: assets/emoji/)
    assert sum(f.stat().st_size for f in files) < 12e6
    loaded = load_assets(DemoConfig())
    assert loaded is not None
    model, clf = loaded
    sp = make_splits({"nonmember_eval": 200}, seed=0)
    h = sp["nonmember_eval"]
    with torch.no_grad():
        acc = float((clf(h.images).argmax(1) == h.labels).float().mean())
    assert acc > 0.9


def test_caption_dropout_and_privacy_draws_change_only_their_own_draws():
    from smplora_plugin import PrivacyConfig, PrivacyRegularizer
    from smplora_plugin.demo.train import train_lora
    from smplora_plugin.errors import ConfigError

    sp = make_splits(SIZES, seed=0)
    members, defense = sp["member"], sp["nonmember_defense"]

    def trained(smp=False, **levers):
        m = TinyLDM(TinyLDMConfig(), seed=0)
        m.add_lora(4, seed=1)
        reg = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=2, seed=0),
                                 load_entry_points=False) if smp else None
        res = train_lora(m, members, steps=3, lr=1e-2, batch_size=4, seed=0, progress=False, reg=reg,
                         nonmembers=defense, **levers)
        return m.lora_state_dict(), res

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    base, res0 = trained()
    # the defaults are the original path, draw for draw; dropout 0 draws no coin
    assert same(base, trained(caption_dropout=0.0)[0])
    dropped, res1 = trained(caption_dropout=0.5)
    assert not same(base, dropped)
    assert res1.losses[0] != res0.losses[0]  # the first step's members already see empty captions
    smp, _ = trained(smp=True)
    assert same(smp, trained(smp=True, privacy_draws=1)[0])
    averaged, res_k = trained(smp=True, privacy_draws=3)
    assert not same(smp, averaged)
    assert res_k.losses[0] == pytest.approx(trained(smp=True)[1].losses[0])  # the adaptation loss is its own draw
    for bad, match in (({"caption_dropout": 1.0}, "probability"), ({"caption_dropout": True}, "probability"),
                       ({"privacy_draws": 0}, "whole number"), ({"privacy_draws": 2.0}, "whole number")):
        with pytest.raises(ConfigError, match=match):
            trained(smp=True, **bad)
    with pytest.raises(ConfigError, match="needs reg="):
        trained(privacy_draws=2)


def test_flip_augmentation_mirrors_members_and_keeps_the_other_draws():
    from smplora_plugin.demo.data import DigitSet
    from smplora_plugin.demo.train import train_lora

    members = make_splits(SIZES, seed=0)["member"]

    def trained(images, flip):
        m = TinyLDM(TinyLDMConfig(), seed=0)
        m.add_lora(4, seed=1)
        train_lora(m, DigitSet(images, members.labels, members.ids), steps=3, lr=1e-2, batch_size=4, seed=0,
                   progress=False, flip=flip)
        return m.lora_state_dict()

    symmetric = 0.5 * (members.images + members.images.flip(-1))
    plain, flipped = trained(symmetric, False), trained(symmetric, True)
    # mirror-symmetric members: flipping changes no input, so the batches, timesteps and noise are the same
    assert all(torch.allclose(plain[k], flipped[k], atol=1e-6) for k in plain)
    plain, flipped = trained(members.images, False), trained(members.images, True)
    assert any(not torch.allclose(plain[k], flipped[k], atol=1e-6) for k in plain)
