"""The attacker's input grid: maps are never pooled up, the first batch fixes the size, it survives a resume,
and the state stays small at SD1.5's latent size."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from smplora_plugin import PrivacyConfig, PrivacyRegularizer, loss_maps

from _helpers import small_reg


def test_small_maps_are_never_pooled_up():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 20, generator=g), torch.randn(2, 4, 6, 20, generator=g)
    maps = loss_maps(pred, target, 16)
    assert maps.shape == (2, 4, 6, 16)   # 6 rows kept as they are, 20 columns pooled down to 16
    rows = ((pred - target) ** 2)
    torch.testing.assert_close(maps, F.adaptive_avg_pool2d(rows, (6, 16)))
    reg = small_reg(feature_grid=64)
    feats = reg.features(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g))
    assert reg.input_grid == (8, 8) and feats.shape == (3, 4 * 8 * 8)
    reg.step(torch.tensor(1.0), feats, feats)
    assert reg.attacker.in_features == 4 * 8 * 8   # not 4 x 64 x 64 of repeated values


def test_input_grid_is_fixed_by_the_first_batch_across_buckets():
    g = torch.Generator().manual_seed(1)
    reg = small_reg(feature_grid=16)

    def feats(h, w):
        return reg.features(torch.randn(2, 4, h, w, generator=g), torch.randn(2, 4, h, w, generator=g))

    first = feats(12, 40)                       # first bucket: 12 rows (below the grid) x 40 columns
    assert reg.input_grid == (12, 16) and first.shape == (2, 4 * 12 * 16)
    for h, w in [(64, 64), (40, 24), (96, 128)]:  # later buckets land on the same size
        assert feats(h, w).shape == first.shape
    reg.step(torch.tensor(1.0), first, feats(64, 64))
    assert reg.attacker.in_features == 4 * 12 * 16
    # raw 4-D maps handed to step() are pooled to the fixed grid as well
    raw = torch.rand(2, 4, 48, 80, generator=g)
    reg.step(torch.tensor(1.0), raw, torch.rand(2, 4, 32, 32, generator=g))
    assert reg.input_grid == (12, 16)


def test_input_grid_is_saved_restored_and_in_the_file_metadata(tmp_path):
    g = torch.Generator().manual_seed(2)
    reg = small_reg(feature_grid=16, dropout=0.5)
    x = [torch.randn(2, 4, 12, 40, generator=g) for _ in range(4)]
    reg.step(torch.tensor(1.0), reg.features(x[0], x[1]), reg.features(x[2], x[3]))
    reg.save(tmp_path / "s.safetensors")
    back = PrivacyRegularizer.load(tmp_path / "s.safetensors")
    assert back.input_grid == (12, 16)
    # the next batch, of another bucket, is pooled to the saved grid and scores exactly as before the save
    y = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g)
    torch.testing.assert_close(back.scores(back.features(*y)), reg.scores(reg.features(*y)), rtol=0, atol=0)
    assert json.loads(reg.file_metadata()["smplora.feature_grid"]) == [12, 16]


@pytest.mark.parametrize("preset, grid, limit_mb", [("paper", 16, 10), ("robust", 32, 28)])
def test_attacker_state_size_at_sd15_latents(tmp_path, preset, grid, limit_mb):
    """4x64x64 latents (SD1.5 at 512 px), batch 2: the defaults' (paper) state file is at most 10 MB; the
    robust preset's, with its 32x32 grid, at most 28 MB (README)."""
    g = torch.Generator().manual_seed(3)
    reg = PrivacyRegularizer(PrivacyConfig.preset(preset), load_entry_points=False)
    lat = [torch.randn(2, 4, 64, 64, generator=g) for _ in range(4)]
    ref = {"reference": torch.zeros(2, 4, 64, 64)} if reg.config.calibrated else {}
    reg.step(torch.tensor(1.0), reg.features(lat[0], lat[1], **ref), reg.features(lat[2], lat[3], **ref))
    assert reg.input_grid == (grid, grid) and reg.attacker.in_features == 4 * grid * grid
    path = tmp_path / "smplora_state.safetensors"
    reg.save(path)
    assert path.stat().st_size <= limit_mb * 1024 * 1024
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["meta.input_grid"]) == [grid, grid]
