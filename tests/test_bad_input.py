"""Every bad input raises an error naming the argument and the fix, before any state changes."""

import pytest
import torch

from smplora_plugin import ConfigError, FeatureError, PrivacyRegularizer, StateError

from _helpers import small_reg


def _snapshot(reg):
    return (
        {k: v.clone() for k, v in reg.attacker.state_dict().items()},
        repr(reg.optimizer.state_dict()["state"]),
        reg._generator.get_state().clone(),
        (reg.global_step, reg.attacker_updates, reg.attacker_steps),
    )


def _same(a, b):
    return (all(torch.equal(v, b[0][k]) for k, v in a[0].items()) and a[1] == b[1]
            and torch.equal(a[2], b[2]) and a[3] == b[3])


@pytest.fixture
def warm():
    reg = small_reg()
    m, n = torch.rand(3, 2, 4, 4, requires_grad=True), torch.rand(3, 2, 4, 4)
    reg.step(torch.tensor(1.0, requires_grad=True), m, n)
    return reg


def _loss():
    return torch.tensor(1.0, requires_grad=True)


def _m(n=3, c=2, h=4):
    return torch.rand(n, c, h, h, requires_grad=True)


BAD_STEPS = {
    "non-scalar loss": (lambda: (torch.ones(3, requires_grad=True), _m(), torch.rand(3, 2, 4, 4)), "scalar"),
    "nan loss": (lambda: (torch.tensor(float("nan"), requires_grad=True), _m(), torch.rand(3, 2, 4, 4)), "not finite"),
    "inf member feats": (lambda: (_loss(), _m().detach().fill_(float("inf")).requires_grad_(), torch.rand(3, 2, 4, 4)),
                         "member_feats"),
    "nan nonmember feats": (lambda: (_loss(), _m(), torch.full((3, 2, 4, 4), float("nan"))), "nonmember_feats"),
    "member feats without grad": (lambda: (_loss(), _m().detach(), torch.rand(3, 2, 4, 4)), "no gradient"),
    "feature size mismatch": (lambda: (_loss(), _m(), torch.rand(3, 3, 4, 4)), "features per sample"),
    "channel change after build": (lambda: (_loss(), _m(c=5), torch.rand(3, 5, 4, 4)), "attacker was built"),
    "empty batch": (lambda: (_loss(), torch.rand(0, 2, 4, 4, requires_grad=True), torch.rand(3, 2, 4, 4)), "empty"),
    "1-d features": (lambda: (_loss(), torch.rand(3, requires_grad=True), torch.rand(3, 2, 4, 4)), "shape"),
    "missing nonmembers": (lambda: (_loss(), _m(), None), "nonmember_feats is None"),
    "integer features": (lambda: (_loss(), _m(), torch.ones(3, 2, 4, 4, dtype=torch.long)), "floating point"),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_step_inputs_raise_before_state_changes(warm, case):
    make, message = BAD_STEPS[case]
    before = _snapshot(warm)
    with pytest.raises(FeatureError, match=message):
        warm.step(*make())
    assert _same(_snapshot(warm), before)


def test_unpooled_features_that_change_size_are_refused():
    reg = small_reg(feature_grid=None)
    reg.update_attacker(torch.rand(2, 2, 4, 4), torch.rand(2, 2, 4, 4))
    before = _snapshot(reg)
    with pytest.raises(FeatureError, match="feature_grid=\\(h, w\\)"):
        reg.update_attacker(torch.rand(2, 2, 6, 4), torch.rand(2, 2, 6, 4))
    assert _same(_snapshot(reg), before)


@pytest.mark.parametrize("field,value,message", [
    ("alpha", -0.1, "alpha"), ("beta", 0.0, "beta"), ("beta", -1, "beta"), ("objective", "xyz", "objective"),
    ("k_steps", -1, "k_steps"), ("k_steps", 1.5, "k_steps"), ("dropout", 1.0, "dropout"), ("hidden", (), "hidden"),
    ("attacker_lr", 0, "attacker_lr"), ("feature_grid", (3,), "feature_grid"), ("alpha", float("nan"), "alpha"),
    ("device", "warp-drive", "device"), ("seed", -3, "seed"), ("alpha", "abc", "alpha"),
])
def test_invalid_config_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        PrivacyRegularizer(**{field: value})


def test_unknown_config_field_is_named():
    with pytest.raises(ConfigError, match="lambda_"):
        PrivacyRegularizer(lambda_=0.1)


def test_state_from_another_config_is_refused(tmp_path, warm):
    path = tmp_path / "s.safetensors"
    warm.save(path)
    other = small_reg(alpha=0.5)
    other.step(torch.tensor(1.0, requires_grad=True), _m(), torch.rand(3, 2, 4, 4))
    before = _snapshot(other)
    with pytest.raises(StateError, match="alpha"):
        other.load_state_dict(PrivacyRegularizer.load(path).state_dict())
    assert _same(_snapshot(other), before)


def test_corrupt_or_foreign_state_files_are_refused(tmp_path, warm):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00not json at all....")
    with pytest.raises(StateError, match="not a readable"):
        PrivacyRegularizer.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(StateError, match="not a smplora regulariser state"):
        PrivacyRegularizer.load(foreign)
    with pytest.raises(StateError, match="does not exist"):
        PrivacyRegularizer.load(tmp_path / "missing.safetensors")
    # a truncated copy of a real state file
    good = tmp_path / "good.safetensors"
    warm.save(good)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StateError):
        PrivacyRegularizer.load(trunc)
