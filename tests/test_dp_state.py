"""DPGradients state: a resumed run equals the uninterrupted one bitwise; other settings are refused."""

import copy
import json

import pytest
import torch
from test_dp_mechanism import TinyLoRA, data, loss_fn

from smplora_plugin.dp import DPError, DPGradients, PoissonBatchSampler

from _helpers import one_thread  # noqa: F401

N, Q = 24, 0.25
SETTINGS = dict(noise_multiplier=0.7, max_grad_norm=0.3, dataset_size=N, sample_rate=Q)


def _train(model, opt, dp, x, y, batches):
    for idx in batches:
        dp.accumulate(loss_fn, x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        dp.step()
        opt.step()


def _setup(noise_seed):
    model = TinyLoRA()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    dp = DPGradients(model, generator=torch.Generator().manual_seed(noise_seed), **SETTINGS)
    return model, opt, dp


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_resume_mid_run_equals_the_uninterrupted_run_bitwise(method, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    x, y = data(N, scale=[0.1, 5, 1, 20] * 6)
    model, opt, dp = _setup(7)
    dp.default_method = method
    _train(model, opt, dp, x, y, PoissonBatchSampler(N, Q, steps=8, generator=torch.Generator().manual_seed(1)))

    model2, opt2, dp2 = _setup(7)
    dp2.default_method = method
    g = torch.Generator().manual_seed(1)
    _train(model2, opt2, dp2, x, y, PoissonBatchSampler(N, Q, steps=3, generator=g))
    # save everything a run needs, the DP state through a safetensors file (tensors + string metadata)
    state = dp2.state_dict()
    path = tmp_path / "dp.safetensors"
    save_file({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, str(path),
              metadata={k: v for k, v in state.items() if isinstance(v, str)})
    saved_model, saved_opt = copy.deepcopy(model2.state_dict()), copy.deepcopy(opt2.state_dict())
    sampler_state = g.get_state()
    del model2, opt2, dp2

    model3, opt3, dp3 = _setup(12345)                         # another noise seed: the state must restore it
    dp3.default_method = method
    model3.load_state_dict(saved_model)
    opt3.load_state_dict(saved_opt)
    with safe_open(str(path), framework="pt") as f:
        loaded = {**load_file(str(path)), **(f.metadata() or {})}
    dp3.load_state_dict(loaded)
    assert dp3.steps == 3
    g3 = torch.Generator()
    g3.set_state(sampler_state)
    _train(model3, opt3, dp3, x, y, PoissonBatchSampler(N, Q, steps=5, generator=g3))

    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert dp3.accountant.history == dp.accountant.history and dp3.steps == 8
    assert dp3.epsilon() == dp.epsilon()
    assert torch.equal(dp3.generator.get_state(), dp.generator.get_state())


@pytest.mark.parametrize("change", [dict(noise_multiplier=0.8), dict(max_grad_norm=0.31), dict(sampling="fixed_batch"),
                                    dict(accountant="prv"), dict(delta=1e-3), dict(sample_rate=0.5),
                                    dict(dataset_size=48, sample_rate=0.125)])
def test_resume_with_other_settings_is_refused_and_changes_nothing(change):
    _, _, dp = _setup(0)
    for p in dp.params:
        p.grad = None
    dp.step()
    state = dp.state_dict()
    settings = {**SETTINGS, **change}
    if change.get("sampling") == "fixed_batch":
        settings["sample_rate"] = 0.25
    other = DPGradients(TinyLoRA(), generator=torch.Generator().manual_seed(3), **settings)
    rng_before = other.generator.get_state().clone()
    with pytest.raises(DPError, match="saved with other DP settings") as info:
        other.load_state_dict(state)
    assert "Construct DPGradients with the saved settings" in str(info.value)
    assert other.steps == 0 and torch.equal(other.generator.get_state(), rng_before)


def test_target_epsilon_resumes_with_the_same_sigma():
    pytest.importorskip("opacus")
    kw = dict(max_grad_norm=0.3, dataset_size=N, sample_rate=Q, target_epsilon=4.0, steps=20)
    a = DPGradients(TinyLoRA(), **kw)
    b = DPGradients(TinyLoRA(), **kw)
    for p in a.params:
        p.grad = None
    a.step()
    b.load_state_dict(a.state_dict())
    assert b.steps == 1 and b.noise_multiplier == a.noise_multiplier


def _corrupt(state, **meta):
    out = dict(state)
    out["dp.meta"] = json.dumps({**json.loads(state["dp.meta"]), **meta})
    return out


def test_corrupt_states_are_refused_before_anything_changes():
    _, _, dp = _setup(0)
    for p in dp.params:
        p.grad = None
    dp.step()
    good = dp.state_dict()
    fresh = _setup(1)[2]
    before = fresh.generator.get_state().clone()
    bad = [
        ({}, "not a DPGradients state"),
        ({"dp.meta": "{not json", "dp.rng": good["dp.rng"]}, "not a DPGradients state"),
        (_corrupt(good, format="other/1"), "expected format"),
        (_corrupt(good, steps=5), "step count does not match"),
        (_corrupt(good, accountant={**json.loads(good["dp.meta"])["accountant"], "history": [[0.7, 0.25, -1]]}),
         "corrupt"),
        (_corrupt(good, accountant={**json.loads(good["dp.meta"])["accountant"], "history": "x"}), "corrupt"),
        ({**good, "dp.rng": torch.zeros(3, dtype=torch.uint8)}, "generator state is corrupt"),
        (_corrupt(good, accountant="rdp"), "no accountant record"),
    ]
    for state, message in bad:
        with pytest.raises(DPError, match=message):
            fresh.load_state_dict(state)
        assert fresh.steps == 0 and torch.equal(fresh.generator.get_state(), before)


def test_state_is_taken_between_steps_only():
    model, _, dp = _setup(0)
    x, y = data(3)
    dp.accumulate(loss_fn, x, y)
    with pytest.raises(DPError, match="after dp.step"):
        dp.state_dict()
    clean = _setup(2)[2].state_dict()
    with pytest.raises(DPError, match="before accumulating"):
        dp.load_state_dict(clean)
    assert dp.pending == 3
