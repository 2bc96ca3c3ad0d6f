"""Saved and resumed runs continue exactly; state files hold no pickle; the codec (state.py) reads no meaning."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from smplora_plugin import PrivacyRegularizer, StateError
from smplora_plugin.state import read_state, save_state, state_from_bytes, state_to_bytes

from _helpers import TinyDenoiser, batch, small_reg


def _train(model, reg, opt, steps, start):
    losses = []
    for i in range(start, start + steps):
        x, noise = batch(4, seed=100 + i)
        xn, noisen = batch(3, seed=500 + i)
        pred = model(x + noise)
        loss = F.mse_loss(pred, noise)
        update = (i % 2 == 0) or i > 5
        nonmember = None
        if reg.wants_nonmembers(update):
            with torch.no_grad():
                nonmember = reg.features(model(xn + noisen), noisen)
        out = reg.step(loss, reg.features(pred, noise), nonmember, update_attacker=update)
        opt.zero_grad()
        out.backward()
        opt.step()
        losses.append(out.item())
    return losses


@pytest.mark.parametrize("every", [1, 3])
def test_save_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, every):
    torch.manual_seed(0)
    model_a, reg_a = TinyDenoiser(), small_reg(dropout=0.5, k_steps=2, nonmember_every=every)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1)
    full = _train(model_a, reg_a, opt_a, 10, 0)

    model_b, reg_b = TinyDenoiser(), small_reg(dropout=0.5, k_steps=2, nonmember_every=every)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    first = _train(model_b, reg_b, opt_b, 4, 0)
    reg_b.save(tmp_path / "smplora_state.safetensors")
    model_state = {k: v.clone() for k, v in model_b.state_dict().items()}
    del reg_b

    model_c = TinyDenoiser(seed=99)
    model_c.load_state_dict(model_state)
    opt_c = torch.optim.SGD(model_c.parameters(), lr=0.1)
    reg_c = PrivacyRegularizer.load(tmp_path / "smplora_state.safetensors")
    second = _train(model_c, reg_c, opt_c, 6, 4)

    assert first + second == full  # bit-identical losses
    for k, v in reg_a.attacker.state_dict().items():
        assert torch.equal(v, reg_c.attacker.state_dict()[k])
    assert reg_c.metrics() == reg_a.metrics()


def test_state_dict_round_trip_and_file_layout(tmp_path):
    reg = small_reg()
    reg.update_attacker(torch.rand(2, 2, 4, 4), torch.rand(2, 2, 4, 4))
    sd = reg.state_dict()
    assert all(isinstance(v, (torch.Tensor, str)) for v in sd.values())
    other = small_reg()
    other.load_state_dict(sd)
    assert other.attacker_updates == 1
    path = tmp_path / "s.safetensors"
    reg.save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["meta.config"])["hidden"] == [16, 8]
    assert any(k.startswith("attacker.") for k in keys) and any(k.startswith("optimizer.") for k in keys)
    assert "rng.attacker" in keys
    assert not list(tmp_path.glob("*.tmp"))
    assert path.stat().st_mode & 0o044, "state file should be readable like any file the user writes"


def test_state_of_an_unbuilt_regulariser_round_trips(tmp_path):
    reg = small_reg()
    reg.save(tmp_path / "empty.safetensors")
    again = PrivacyRegularizer.load(tmp_path / "empty.safetensors")
    assert again.attacker is None and again.config == reg.config


def test_the_codec_round_trips_any_tensors_and_strings_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"meta.format": "smplora-state/1", "meta.anything": "not json, kept as is",
             "a.b": torch.randn(2, 3, generator=g), "ints": torch.arange(5), "half": torch.ones(2).half(),
             "rng": torch.Generator().manual_seed(1).get_state()}
    for back in (state_from_bytes(state_to_bytes(state)), read_state(save_state(state, tmp_path / "s.safetensors"))):
        assert back.keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
            else:
                assert back[key] == value, key


def test_the_codec_refuses_other_values_before_touching_the_file(tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"the previous state")
    with pytest.raises(StateError, match=r"\['meta.counters'\] are neither tensors nor strings"):
        save_state({"meta.format": "smplora-state/1", "meta.counters": {"global_step": 1}}, path)
    assert path.read_bytes() == b"the previous state" and not list(tmp_path.glob("*.tmp"))


def test_bytes_that_are_not_a_regulariser_state_are_refused():
    from safetensors.torch import save

    with pytest.raises(StateError, match="not a readable"):
        state_from_bytes(b"\x05\x00")
    with pytest.raises(StateError, match="not a smplora regulariser state"):
        state_from_bytes(save({"w": torch.ones(2)}, metadata={"format": "pt"}))
    good = state_to_bytes(small_reg().state_dict())
    with pytest.raises(StateError, match="not a readable"):
        state_from_bytes(good[: len(good) - 3])
