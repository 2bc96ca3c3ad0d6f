"""benchmarks/distill.py (a frontier lever): content keys, shard assignment and the students' targets."""

import pytest
import torch

from benchmarks.distill import ShardTargets, assign_shards, content_key
from smplora_plugin.errors import ConfigError, InputError


def test_content_key_sees_values_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 8, 8, generator=g)
    assert content_key(a) == content_key(a.clone())
    assert content_key(a) != content_key(a.flip(-1))
    assert content_key(a) != content_key(a.double())
    assert content_key(a) != content_key(a.reshape(3, 64))
    assert content_key(a.bfloat16()) == content_key(a.bfloat16().clone())


def test_copies_share_a_shard_and_shards_are_balanced():
    keys = [f"img{i}" for i in range(20)] + ["img3", "img3", "img17"]
    shard = assign_shards(keys, 4, seed=5)
    assert shard == assign_shards(keys, 4, seed=5)            # seeded
    assert shard != assign_shards(keys, 4, seed=6)
    for i, k in enumerate(keys):
        assert shard[i] == shard[keys.index(k)]                # every copy sits with its first occurrence
    distinct = {k: s for k, s in zip(keys, shard)}
    sizes = [list(distinct.values()).count(s) for s in range(4)]
    assert sorted(sizes) == [5, 5, 5, 5]


@pytest.mark.parametrize("shards", [1, 0, 2.0, True])
def test_bad_shard_count_is_refused(shards):
    with pytest.raises(ConfigError, match="shards must be an integer >= 2"):
        assign_shards(["a", "b", "c"], shards, seed=0)


def test_too_few_distinct_images_are_refused():
    with pytest.raises(InputError, match="2 distinct images cannot fill 3 shards"):
        assign_shards(["a", "b", "a", "b"], 3, seed=0)


def _constant_teacher(value):
    return lambda z, t: torch.full_like(z, float(value)) + 0 * t.view(-1, 1)


def test_each_row_gets_the_mean_of_the_teachers_that_did_not_see_it():
    shard_of = [0, 1, 2, 0, 1]
    targets = ShardTargets([_constant_teacher(v) for v in (1.0, 10.0, 100.0)], shard_of)
    idx = torch.tensor([4, 0, 2, 3])
    z, t = torch.zeros(4, 2), torch.arange(4)
    out = targets(idx, z, t)
    expect = torch.tensor([(1 + 100) / 2, (10 + 100) / 2, (1 + 10) / 2, (10 + 100) / 2])
    assert torch.allclose(out, expect.view(-1, 1).expand(4, 2))
    two = ShardTargets([_constant_teacher(1.0), _constant_teacher(2.0)], [0, 1])
    assert torch.equal(two(torch.tensor([1, 0, 1]), torch.zeros(3, 1), torch.zeros(3)),
                       torch.tensor([[1.0], [2.0], [1.0]]))


def test_teachers_see_only_the_rows_they_serve_and_no_gradient_flows():
    seen = {0: [], 1: []}

    def teacher(s):
        def f(z):
            seen[s].append(z[:, 0].tolist())
            return z * (s + 2)
        return f

    z = torch.arange(4.0).view(4, 1).requires_grad_(True)
    out = ShardTargets([teacher(0), teacher(1)], [0, 0, 1, 1])(torch.arange(4), z)
    assert seen == {0: [[2.0, 3.0]], 1: [[0.0, 1.0]]}
    assert out.squeeze(1).tolist() == [0.0, 3.0, 4.0, 6.0] and not out.requires_grad


def test_bad_teachers_are_refused():
    with pytest.raises(ConfigError, match="at least 2 teachers"):
        ShardTargets([_constant_teacher(0)], [0, 0])
    with pytest.raises(InputError, match=r"shard ids \[2\] have no teacher"):
        ShardTargets([_constant_teacher(0), _constant_teacher(1)], [0, 2, 1])


def test_the_student_learns_the_teachers_targets_not_the_noise():
    from smplora_plugin.demo.data import DigitSet
    from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig
    from smplora_plugin.demo.train import train_lora

    torch.manual_seed(0)
    cfg = TinyLDMConfig()
    g = torch.Generator().manual_seed(1)
    data = DigitSet(torch.rand(8, 1, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
                    torch.arange(8) % 3, [f"m{i}" for i in range(8)])
    zero = ShardTargets([lambda z, t, c: torch.zeros_like(z)] * 2, [0, 1] * 4)

    def trained(targets):
        model = TinyLDM(cfg, seed=0)
        model.add_lora(4, seed=0)
        return train_lora(model, data, steps=30, lr=5e-3, batch_size=4, seed=0, progress=False, targets=targets)

    to_zero, to_noise = trained(zero), trained(None)
    assert to_zero.losses[-1] < 0.5 * to_zero.losses[0]        # its own loss is against the (zero) targets
    assert to_noise.losses[-1] > 5 * to_zero.losses[-1]          # the noise target is another objective
    with pytest.raises(ConfigError, match="do not combine"):
        model = TinyLDM(cfg, seed=0)
        model.add_lora(4, seed=0)
        train_lora(model, data, steps=1, lr=1e-3, batch_size=4, seed=0, progress=False, targets=zero,
                   reg=object(), nonmembers=data)


def test_timestep_probe_calibrates_against_untouched_and_never_trains(tmp_path, monkeypatch):
    from benchmarks import distill_timesteps as dt
    from benchmarks import frontier as fr

    monkeypatch.setenv("SMPLORA_FRONTIER_CACHE", str(tmp_path))
    rc = fr.Recipe(dataset="textures", members=8, steps=2)
    with pytest.raises(SystemExit, match="first row must be 'untouched'"):
        dt.measure(rc, ["plain", "untouched"], [0], [100], 1)
    with pytest.raises(SystemExit, match="not in the frontier cache"):
        dt.measure(rc, ["untouched", "plain"], [0], [100], 1)
    assert not (tmp_path / "lora").exists() or not any((tmp_path / "lora").iterdir())  # nothing trained


def test_timestep_probe_losses_repeat_with_the_seed():
    from benchmarks import distill_timesteps as dt
    from smplora_plugin.demo.model import TinyLDM, TinyLDMConfig

    model = TinyLDM(TinyLDMConfig(), seed=0)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a = dt.per_sample_losses(model, images, ["a", "b", "c"], [10, 500], draws=2, seed=4)
    assert a.shape == (2, 3) and torch.equal(a, dt.per_sample_losses(model, images, ["a", "b", "c"], [10, 500], 2, 4))
    assert not torch.equal(a, dt.per_sample_losses(model, images, ["a", "b", "c"], [10, 500], 2, 5))
