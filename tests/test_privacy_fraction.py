"""``privacy_fraction``: the privacy term (and the base forward) on a leading share of each batch."""

from __future__ import annotations

import pytest
import torch

from smplora_plugin import PrivacyConfig, PrivacyRegularizer
from smplora_plugin.errors import ConfigError


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "quarter", True])
def test_fraction_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="privacy_fraction"):
        PrivacyConfig(privacy_fraction=bad)


@pytest.mark.parametrize("fraction, batch, rows", [(1.0, 7, 7), (0.25, 32, 8), (0.25, 33, 9), (0.25, 3, 1),
                                                   (0.5, 1, 1), (0.3, 10, 3)])
def test_privacy_rows(fraction, batch, rows):
    reg = PrivacyRegularizer(privacy_fraction=fraction, load_entry_points=False)
    assert reg.privacy_rows(batch) == rows


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_privacy_rows_bad_batch(bad):
    with pytest.raises(ValueError, match="batch_size"):
        PrivacyRegularizer(load_entry_points=False).privacy_rows(bad)


def test_fraction_survives_state_roundtrip(tmp_path):
    reg = PrivacyRegularizer(privacy_fraction=0.25, feature_grid=2, hidden=(4,), load_entry_points=False)
    reg.save(tmp_path / "s.safetensors")
    back = PrivacyRegularizer.load(tmp_path / "s.safetensors", load_entry_points=False)
    assert back.config.privacy_fraction == 0.25 and back.privacy_rows(32) == 8


def test_demo_loop_feeds_only_the_leading_share():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    from smplora_plugin.demo.data import make_splits
    from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig
    from smplora_plugin.demo.train import train_lora

    class Spy(PrivacyRegularizer):
        rows, base_rows = [], []

        def features(self, pred, target, timesteps=None, reference=None):
            self.rows.append(pred.shape[0])
            self.base_rows.append(None if reference is None else reference.shape[0])
            return super().features(pred, target, timesteps=timesteps, reference=reference)

    s = make_splits({"member": 12, "nonmember_defense": 12}, seed=0)
    model = TinyLDM(TinyLDMConfig(), seed=0)
    model.add_lora(2, seed=0)
    reg = Spy(PrivacyConfig.preset("robust", privacy_fraction=0.25, feature_grid=4, hidden=(8,), nonmember_every=1),
              load_entry_points=False)
    train_lora(model, s["member"], steps=2, lr=1e-3, batch_size=12, seed=0, reg=reg, nonmembers=s["nonmember_defense"],
               progress=False)
    assert reg.rows == [3, 3, 3, 3] and reg.base_rows == [3, 3, 3, 3]  # member + non-member, two steps
    assert torch.isfinite(torch.tensor(reg.metrics()["attacker_ce_member"]))
