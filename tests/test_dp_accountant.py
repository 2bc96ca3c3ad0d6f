"""DP accounting: Opacus's epsilon for the same (q, sigma, steps), target epsilon, the sampling it assumes, headers."""

import json
import math

import pytest
import torch

from smplora_plugin import read_privacy_metadata
from smplora_plugin.dp import DPAccountant, DPGradients, default_delta
from smplora_plugin.metadata import annotate

from _helpers import one_thread, small_reg  # noqa: F401

opacus_accountants = pytest.importorskip("opacus.accountants")


def _dp(**kw):
    p = torch.nn.Parameter(torch.zeros(3))
    args = dict(noise_multiplier=1.1, max_grad_norm=1.0, dataset_size=200, expected_batch_size=10,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return DPGradients([p], **args)


def _run(dp, steps):
    for _ in range(steps):
        for p in dp.params:
            p.grad = None
        dp.step()                      # an empty Poisson batch: noise only, one mechanism step each
    return dp


@pytest.mark.parametrize("mechanism,cls", [("rdp", "RDPAccountant"), ("prv", "PRVAccountant")])
def test_epsilon_matches_opacus_for_the_same_q_sigma_and_steps(mechanism, cls):
    dp = _run(_dp(accountant=mechanism, noise_multiplier=0.9), 40)
    ref = getattr(opacus_accountants, cls)()
    for _ in range(40):
        ref.step(noise_multiplier=0.9, sample_rate=10 / 200)
    delta = 1e-4
    assert dp.accountant.history == [(0.9, 0.05, 40)]
    assert dp.epsilon(delta) == pytest.approx(ref.get_epsilon(delta=delta), rel=1e-9)
    assert dp.epsilon() == pytest.approx(ref.get_epsilon(delta=dp.delta), rel=1e-9)
    assert dp.epsilon(delta) > 0


def test_epsilon_grows_with_steps_and_falls_with_noise():
    assert _run(_dp(), 5).epsilon() < _run(_dp(), 20).epsilon()
    assert _run(_dp(noise_multiplier=2.0), 20).epsilon() < _run(_dp(), 20).epsilon()
    assert _dp().epsilon() == 0.0                        # nothing released yet


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_target_epsilon_gives_a_sigma_that_spends_it(mechanism):
    from opacus.accountants.utils import get_noise_multiplier

    steps, target = 60, 2.0
    dp = _dp(noise_multiplier=None, target_epsilon=target, steps=steps, accountant=mechanism)
    assert dp.noise_multiplier == get_noise_multiplier(target_epsilon=target, target_delta=dp.delta,
                                                       sample_rate=0.05, steps=steps, accountant=mechanism)
    _run(dp, steps)
    eps = dp.epsilon()
    assert target - 0.02 <= eps <= target + 1e-9          # the bisection's tolerance is 0.01, from below
    # and the sigma is the smallest that does it (to the bisection's precision)
    lower = _run(_dp(noise_multiplier=dp.noise_multiplier * 0.9, accountant=mechanism), steps)
    assert lower.epsilon() > target
    assert f"Target epsilon {target:g} over {steps} planned steps" in dp.summary()


def test_default_delta():
    assert default_delta(200) == pytest.approx(1 / (200 * math.log(200)))
    assert default_delta(1) == 1e-5
    assert _dp().delta == pytest.approx(1 / (200 * math.log(200)))
    assert _dp(delta=1e-6).delta == 1e-6
    # N from q and B when the data set size is not given
    assert _dp(dataset_size=None, sample_rate=0.05).dataset_size == 200


def test_every_epsilon_text_carries_its_sampling():
    poisson = _run(_dp(), 3)
    fixed = _run(_dp(sampling="fixed_batch"), 0)
    text = poisson.summary()
    assert "Poisson sampling at q = 0.05" in text and "as the accountant assumes" in text
    assert f"epsilon {poisson.epsilon():.4g} at delta" in text
    assert fixed.sampling == "fixed_batch"
    for t in (fixed.summary(), repr(fixed), repr(fixed.accountant), fixed.accountant.summary()):
        assert ("epsilon as computed by the Poisson accountant at q = B/N = 0.05; the run's fixed-size batches do "
                "not satisfy its assumption") in t
    assert "Poisson sampling" in repr(poisson) and "Poisson sampling" in repr(poisson.accountant)
    assert _dp(sampling="shuffled").sampling == "fixed_batch"


def test_file_metadata_is_a_valid_smplora_header_entry(tmp_path):
    from safetensors.torch import save_file

    dp = _run(_dp(sampling="fixed_batch", accountant="prv"), 0)
    x = dp.params[0]
    x.grad = None
    # fixed batches of exactly B: run one real step
    dp.accumulate(lambda params, v: (params[0] * v).sum(), torch.randn(10, 3))
    dp.step()
    entries = dp.file_metadata()
    assert list(entries) == ["smplora.dp"]
    info = json.loads(entries["smplora.dp"])
    for key in ("epsilon", "delta", "sigma", "clip", "sampling", "sample_rate", "steps", "accountant"):
        assert key in info
    assert info["epsilon"] == pytest.approx(dp.epsilon()) and info["epsilon"] > 0
    assert (info["sigma"], info["clip"], info["sampling"], info["sample_rate"], info["steps"], info["accountant"]) \
        == (1.1, 1.0, "fixed_batch", 0.05, 1, "prv")
    assert "do not satisfy its assumption" in info["assumption"]
    assert info["objective"] == "dp-sgd" and "caveat" not in info
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ss_network_dim": "4"})
    annotate(path, entries=entries)
    assert read_privacy_metadata(path)["smplora.dp"] == entries["smplora.dp"]


def test_with_the_regulariser_the_caveat_is_reported():
    reg = small_reg(k_steps=1)
    dp = _dp(regularizer=reg)
    info = json.loads(dp.file_metadata()["smplora.dp"])
    assert info["objective"] == "smp-lora + dp noise"
    assert "not a guarantee for the whole run" in info["caveat"] and "not a guarantee for the whole run" in dp.summary()
    assert "caveat" not in json.loads(_dp(regularizer=small_reg(k_steps=0)).file_metadata()["smplora.dp"])
    assert json.loads(_dp(regularizer=small_reg(objective="mp")).file_metadata()["smplora.dp"])["objective"] \
        == "mp-lora + dp noise"


def test_accountant_alone():
    acc = DPAccountant("rdp", sample_rate=0.01, delta=1e-5)
    for sigma in (1.0, 1.0, 2.0):
        acc.step(sigma)
    assert acc.history == [(1.0, 0.01, 2), (2.0, 0.01, 1)] and acc.steps == 3
    ref = opacus_accountants.RDPAccountant()
    for sigma in (1.0, 1.0, 2.0):
        ref.step(noise_multiplier=sigma, sample_rate=0.01)
    assert acc.epsilon() == ref.get_epsilon(delta=1e-5)


def test_rdp_epsilon_per_step_equals_opacus_bit_for_bit_over_a_mixed_history():
    """The one-step RDP is computed once per (sigma, q); the epsilon after every step is still Opacus's own."""
    from smplora_plugin.dp import DPAccountant

    acc = DPAccountant("rdp", sample_rate=2 / 30, sampling="fixed_batch", delta=0.0098)
    ref = opacus_accountants.RDPAccountant()
    for sigma in [1.0] * 7 + [0.5] * 3 + [1.0] * 5:
        acc.step(sigma)
        ref.step(noise_multiplier=sigma, sample_rate=2 / 30)
        assert acc.epsilon() == max(0.0, ref.get_epsilon(delta=0.0098))
        assert acc.epsilon(1e-5) == max(0.0, ref.get_epsilon(delta=1e-5))
    assert acc.history == [(1.0, 2 / 30, 7), (0.5, 2 / 30, 3), (1.0, 2 / 30, 5)]
    assert sorted(acc._rdp_memo) == [(0.5, 2 / 30), (1.0, 2 / 30)]
