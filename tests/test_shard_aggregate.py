"""benchmarks/shard_aggregate.py (a frontier lever): shards by content, LoRA deltas, the clipped and noised mean,
the refactoring to rank and the one-release epsilon."""

import pytest
import torch

from benchmarks.shard_aggregate import (
    aggregate,
    gaussian_epsilon,
    hash_shards,
    lora_deltas,
    refactor,
    to_lora_state,
    total_norm,
)
from smplora_plugin.errors import ConfigError, InputError


def _state(seed, shapes=(("m.lin", (6, 5), False), ("m.conv", (4, 3), True)), rank=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i), conv in shapes:
        tail = (1, 1) if conv else ()
        out[name + ".lora_A.weight"] = torch.randn(rank, i, *tail, generator=g)
        out[name + ".lora_B.weight"] = torch.randn(o, rank, *tail, generator=g)
    return out


def test_a_row_keeps_its_shard_whatever_the_other_rows_are():
    keys = [f"{i * 7919:064x}" for i in range(1, 40)]
    shard = hash_shards(keys, 4)
    assert shard == [int(k, 16) % 4 for k in keys]
    assert hash_shards(keys[5:] + keys[:1], 4) == shard[5:] + shard[:1]   # removing rows moves no other row
    dup = hash_shards(keys + keys[:3], 4)
    assert dup[-3:] == shard[:3]                                            # copies share a shard


def test_bad_shards_are_refused():
    with pytest.raises(ConfigError, match="shards must be an integer >= 2"):
        hash_shards(["ab"], 1)
    with pytest.raises(InputError, match="hexadecimal"):
        hash_shards(["not hex", "ab"], 2)
    with pytest.raises(InputError, match=r"shards \[1\] of 2 hold no image"):
        hash_shards(["2", "4", "6"], 2)


def test_deltas_are_b_times_a_in_the_layers_shape():
    st = _state(0)
    d = lora_deltas(st, scale=0.5)
    assert torch.allclose(d["m.lin"], 0.5 * st["m.lin.lora_B.weight"] @ st["m.lin.lora_A.weight"])
    assert d["m.conv"].shape == (4, 3, 1, 1)
    conv = st["m.conv.lora_B.weight"].flatten(1) @ st["m.conv.lora_A.weight"].flatten(1)
    assert torch.allclose(d["m.conv"].flatten(1), 0.5 * conv)
    with pytest.raises(InputError, match="unpaired"):
        lora_deltas({k: v for k, v in st.items() if k != "m.lin.lora_B.weight"})


def test_refactor_is_the_best_low_rank_fit_and_round_trips():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(7, 3, generator=g) @ torch.randn(3, 5, generator=g)
    a, b = refactor(low, 3)
    assert a.shape == (3, 5) and b.shape == (7, 3) and torch.allclose(b @ a, low, atol=1e-4)
    a1, b1 = refactor(low, 1)
    sv = torch.linalg.svdvals(low)
    assert torch.allclose(torch.linalg.norm(low - b1 @ a1), torch.linalg.norm(sv[1:]), atol=1e-4)  # Eckart-Young
    d = lora_deltas(_state(2))
    again = lora_deltas(to_lora_state(d, 2))
    assert all(torch.allclose(again[k], d[k], atol=1e-4) for k in d)
    with pytest.raises(ConfigError, match="rank 6 does not fit"):
        refactor(low, 6)


def test_the_mean_clips_each_shard_and_noise_scales_with_the_clip():
    shards = [lora_deltas(_state(s)) for s in range(4)]
    plain, facts = aggregate(shards, clip=None, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert facts["clipped_share"] == 0 and facts["noise_std"] == 0
    assert torch.allclose(plain["m.lin"], sum(s["m.lin"] for s in shards) / 4)
    small = min(total_norm(s) for s in shards) / 2
    clipped, facts = aggregate(shards, clip=small, noise=0.0, generator=torch.Generator().manual_seed(0))
    assert facts["clipped_share"] == 1.0 and total_norm(clipped) <= small + 1e-5
    noised, facts = aggregate(shards, clip=small, noise=1.0, generator=torch.Generator().manual_seed(0))
    assert facts["noise_std"] == pytest.approx(2 * small / 4)
    again, _ = aggregate(shards, clip=small, noise=1.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(noised[k], again[k]) for k in noised)            # seeded
    resid = torch.cat([(noised[k] - clipped[k]).flatten() for k in noised])
    assert resid.std().item() == pytest.approx(2 * small / 4, rel=0.35)


@pytest.mark.parametrize("kw, match", [({"clip": None, "noise": 1.0}, "noise needs a clip"),
                                       ({"clip": 0.0, "noise": 0.0}, "clip must be > 0"),
                                       ({"clip": 1.0, "noise": -1.0}, "noise must be >= 0")])
def test_bad_aggregate_settings_are_refused(kw, match):
    shards = [lora_deltas(_state(s)) for s in range(2)]
    with pytest.raises(ConfigError, match=match):
        aggregate(shards, generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(ConfigError, match="at least 2 shards"):
        aggregate(shards[:1], clip=None, noise=0.0, generator=torch.Generator().manual_seed(0))


def test_one_release_epsilon_falls_with_noise():
    pytest.importorskip("opacus")
    assert gaussian_epsilon(0.0) is None
    e1, e4 = gaussian_epsilon(1.0), gaussian_epsilon(4.0)
    assert 0 < e4 < e1 < 10


def test_release_error_is_zero_without_noise_and_grows_with_it():
    from benchmarks.shard_aggregate import release_error

    shards = [lora_deltas(_state(s)) for s in range(4)]
    clip = min(total_norm(s) for s in shards)
    errs = [release_error(shards, clip=clip, noise=n, rank=2, generator=torch.Generator().manual_seed(0))
            for n in (0.0, 0.01, 1.0)]
    assert errs[0] == 0 and 0 < errs[1] < errs[2]


def test_the_noise_probe_names_the_run_to_make_when_the_cache_lacks_it(tmp_path, monkeypatch):
    from benchmarks.shard_aggregate import main

    monkeypatch.setenv("SMPLORA_FRONTIER_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="run 0 of 'shard avg s8' is not cached.*--rows 'shard avg s8'"):
        main(["--runs", "0"])
