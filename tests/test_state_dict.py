"""PrivacyRegularizer.state_dict / load_state_dict: exact resume, whole validation before any change, old files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smplora_plugin import PrivacyRegularizer, StateError
from smplora_plugin.state import config_from_state, read_state, save_state, state_from_bytes, state_to_bytes

from _helpers import one_thread  # noqa: F401  (autouse: one torch thread)

CFG = dict(hidden=(16, 8), feature_grid=2, attacker_lr=1e-2, seed=3, k_steps=2, dropout=0.5, nonmember_every=3)
#: written by ``reg.save`` of the code before the state API (commit 0d995c3): PrivacyRegularizer(hidden=(16, 8),
#: feature_grid=2, attacker_lr=1e-2, seed=3, nonmember_every=2, k_steps=2) after 3 steps on (3, 2, 4, 4) maps
#: (a non-member batch of 2 when wants_nonmembers()), all drawn from torch.Generator().manual_seed(11)
FIXTURE = Path(__file__).parent / "data" / "smplora_state_v1.safetensors"


def _reg(**kw):
    return PrivacyRegularizer(**{**CFG, **kw}, load_entry_points=False)


def _train(reg, start, steps, batch=3):
    """Steps ``start .. start+steps-1`` of a fixed run: each step's data depends on its index only. Returns the
    regularised losses and the gradients they give the prediction."""
    out = []
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + i)
        pred = torch.randn(batch, 2, 4, 4, generator=g).requires_grad_(True)
        target = torch.randn(batch, 2, 4, 4, generator=g)
        held_pred, held_target = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
        loss = (pred - target).pow(2).mean()
        n, update = reg.privacy_rows(batch), i % 4 != 3       # every 4th step skips the attacker update
        if n == 0:
            reg_loss = reg.step(loss, None)
        else:
            nonmember = reg.features(held_pred, held_target) if reg.wants_nonmembers(update) else None
            reg_loss = reg.step(loss, reg.features(pred[:n], target[:n]), nonmember, update_attacker=update)
        reg_loss.backward()
        out.append((reg_loss.detach(), pred.grad))
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _through(state, how, tmp_path):
    if how == "dict":
        return state
    if how == "bytes":
        return state_from_bytes(state_to_bytes(state))
    save_state(state, tmp_path / "s.safetensors")
    return read_state(tmp_path / "s.safetensors")


@pytest.mark.parametrize("how", ["dict", "bytes", "file"])
@pytest.mark.parametrize("run", [
    {"kw": {}, "batch": 3},                                               # dropout, k=2, bank reused 3 updates
    {"kw": {"privacy_fraction": 0.5, "objective": "mp"}, "batch": 1},     # steps without privacy rows
])
def test_n_steps_then_a_load_then_m_steps_equal_n_plus_m_steps_bitwise(tmp_path, how, run):
    n, m = 5, 6
    whole = _reg(**run["kw"])
    full = _train(whole, 0, n + m, run["batch"])

    first = _reg(**run["kw"])
    head = _train(first, 0, n, run["batch"])
    state = _through(first.state_dict(), how, tmp_path)
    del first
    resumed = _reg(**run["kw"])
    resumed.load_state_dict(state)
    tail = _train(resumed, n, m, run["batch"])

    assert len(head + tail) == len(full)
    for (loss_a, grad_a), (loss_b, grad_b) in zip(head + tail, full):
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    _assert_same_state(resumed.state_dict(), whole.state_dict())   # attacker, Adam, RNG, bank, counters, metrics
    assert resumed.metrics() == whole.metrics()


def test_a_loaded_regulariser_shares_no_tensor_with_the_state():
    source = _reg()
    _train(source, 0, 3)
    state = source.state_dict()
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    reg = _reg()
    reg.load_state_dict(state)
    _train(reg, 3, 3)
    _assert_same_state(state, kept)
    assert not torch.equal(reg.state_dict()["optimizer.0.exp_avg"], state["optimizer.0.exp_avg"])


def _set(key, value):
    def edit(sd):
        sd[key] = value(sd) if callable(value) else value
    return edit


def _drop(key):
    return lambda sd: sd.pop(key)


def _edit_json(key, change):
    def edit(sd):
        doc = json.loads(sd[key])
        change(doc)
        sd[key] = json.dumps(doc)
    return edit


def _all_weights(dtype):
    def edit(sd):
        for k in [k for k in sd if k.startswith("attacker.")]:
            sd[k] = sd[k].to(dtype)
    return edit


BAD_STATES = {   # case: (edit of a valid state, what the error must say)
    "unknown entry": (_set("shim.diffusers.holdout", "{}"), r"unexpected state entries \['shim.diffusers.holdout'\]"),
    "missing weight": (_drop("attacker.layers.0.bias"), r"missing \['attacker.layers.0.bias'\]"),
    "extra weight": (_set("attacker.layers.9.weight", torch.zeros(2)), r"unexpected \['attacker.layers.9.weight'\]"),
    "weight shape": (_set("attacker.layers.1.weight", torch.zeros(3, 3)),
                     r"attacker.layers.1.weight is \(3, 3\), expected \(8, 16\)"),
    "weight dtype": (_all_weights(torch.float16), "float16.*fp32"),
    "moment shape": (_set("optimizer.0.exp_avg", torch.zeros(2)), r"optimizer.0.exp_avg is float32 \(2,\)"),
    "moment dtype": (_set("optimizer.2.exp_avg_sq", lambda sd: sd["optimizer.2.exp_avg_sq"].double()),
                     "optimizer.2.exp_avg_sq is float64"),
    "step shape": (_set("optimizer.1.step", torch.zeros(2)), r"optimizer.1.step is float32 \(2,\)"),
    "missing moment": (_drop("optimizer.3.exp_avg"), r"parameter 3 holds \['exp_avg_sq', 'step'\]"),
    "stray optimizer index": (_set("optimizer.7.exp_avg", torch.zeros(2)), "optimizer.7.exp_avg"),
    "optimizer for other params": (_edit_json("meta.optimizer", lambda d: d["param_groups"][0].update(params=[0, 1])),
                                   "optimiser state is for parameters"),
    "scalars of no index": (_edit_json("meta.optimizer", lambda d: d["scalars"].update({"9": {"x": 1}})),
                            "non-tensor entries"),
    "index out of range": (_edit_json("meta.optimizer", lambda d: d["indices"].append(6)),
                           r"indices \[0, 1, 2, 3, 4, 5, 6\]"),
    "missing optimizer meta": (_drop("meta.optimizer"), "meta.optimizer is missing"),
    "missing rng": (_drop("rng.attacker"), "rng.attacker.*missing"),
    "rng of another size": (_set("rng.attacker", lambda sd: sd["rng.attacker"][:100].clone()),
                            "rng.attacker is not a cpu RNG state"),
    "rng dtype": (_set("rng.attacker", lambda sd: sd["rng.attacker"].float()), "uint8"),
    "bank width": (_set("bank.nonmember", torch.zeros(2, 3)), r"bank.nonmember.*\(2, 3\).*\(n, 8\)"),
    "bank not finite": (_set("bank.nonmember", torch.full((2, 8), float("nan"))), "bank.nonmember"),
    "negative counter": (_edit_json("meta.counters", lambda d: d.update(global_step=-1)), "meta.counters"),
    "missing counter": (_edit_json("meta.counters", lambda d: d.pop("attacker_steps")), "meta.counters"),
    "counters not json": (_set("meta.counters", "{global_step: 3"), "meta.counters is not a JSON string"),
    "unknown metric": (_edit_json("meta.last", lambda d: d.update(accuracy=1.0)), "meta.last"),
    "grid not dividing": (_set("meta.input_grid", "[3, 3]"), "does not divide"),
    "grid corrupt": (_set("meta.input_grid", "[0, 2]"), "input grid"),
    "meta not a string": (_set("meta.counters", {"global_step": 1}), r"\['meta.counters'\] have the wrong type"),
    "tensor not a tensor": (_set("attacker.layers.0.bias", "0"), r"\['attacker.layers.0.bias'\] have the wrong type"),
    "attacker info corrupt": (_edit_json("meta.attacker", lambda d: d.update(in_features=-1)), "meta.attacker"),
    "attacker of another size": (_edit_json("meta.attacker", lambda d: d.update(in_features=12)),
                                 r"in_features=12\): .*expected \(16, 12\)"),
    "tensors without an attacker": (_set("meta.attacker", "null"), "no attacker"),
    "config differs": (_edit_json("meta.config", lambda d: d.update(alpha=0.5, k_steps=3)),
                       r"alpha: saved 0.5 vs this 0.05, k_steps: saved 3 vs this 2"),
    "config corrupt": (_set("meta.config", "{"), "invalid config"),
    "newer format": (_set("meta.format", "smplora-state/2"),
                     r"'smplora-state/2'.*reads 'smplora-state/1'.*pip install -U"),
    "not a state": (_drop("meta.format"), "not a smplora regulariser state"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_a_refused_state_leaves_the_regulariser_unchanged(case):
    edit, message = BAD_STATES[case]
    source = _reg()
    _train(source, 0, 4)
    state = source.state_dict()
    edit(state)
    target = _reg()
    _train(target, 20, 3)                                # another history: every entry differs from the state's
    before = target.state_dict()
    objects = (target.attacker, target.optimizer, target._generator, target._bank, target._last, target.input_grid)
    with pytest.raises(StateError, match=message):
        target.load_state_dict(state)
    _assert_same_state(target.state_dict(), before)      # every tensor, counter, metric and the grid
    after = (target.attacker, target.optimizer, target._generator, target._bank, target._last, target.input_grid)
    assert all(a is b for a, b in zip(objects, after))


def test_a_refused_state_leaves_an_unbuilt_regulariser_unbuilt():
    source = _reg()
    _train(source, 0, 2)
    state = source.state_dict()
    state["optimizer.0.exp_avg"] = torch.zeros(1)
    target = _reg()
    with pytest.raises(StateError, match="optimizer.0.exp_avg"):
        target.load_state_dict(state)
    assert target.attacker is None and target.optimizer is None and target._bank is None
    assert target.state_dict() == _reg().state_dict()


def test_a_newer_format_file_is_refused_by_load_with_the_fix(tmp_path):
    state = _reg().state_dict()
    state["meta.format"] = "smplora-state/2"
    path = tmp_path / "new.safetensors"
    save_state(state, path)
    with pytest.raises(StateError, match="release that wrote it"):
        PrivacyRegularizer.load(path)


def _raw(path):
    """A ``.safetensors`` file's tensors and header metadata, read with safetensors alone."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_a_file_written_before_the_state_api_loads_and_is_written_back_the_same(tmp_path):
    old_tensors, old_meta = _raw(FIXTURE)
    reg = PrivacyRegularizer.load(FIXTURE, load_entry_points=False)
    assert config_from_state(read_state(FIXTURE), FIXTURE) == reg.config     # what the kohya shim reads
    assert (reg.global_step, reg.attacker_updates, reg.attacker_steps) == (3, 3, 6) and reg.input_grid == (2, 2)
    assert {k: v for k, v in reg.metrics().items() if k in json.loads(old_meta["meta.last"])} == \
        json.loads(old_meta["meta.last"])
    reg.save(tmp_path / "again.safetensors")
    new_tensors, new_meta = _raw(tmp_path / "again.safetensors")
    _assert_same_state(new_tensors, old_tensors)
    assert new_meta.keys() == old_meta.keys() and new_meta["meta.format"] == old_meta["meta.format"]
    for key in old_meta.keys() - {"meta.format", "meta.optimizer"}:
        assert json.loads(new_meta[key]) == json.loads(old_meta[key]), key
    old_opt, new_opt = json.loads(old_meta["meta.optimizer"]), json.loads(new_meta["meta.optimizer"])
    assert (new_opt["indices"], new_opt["scalars"]) == (old_opt["indices"], old_opt["scalars"])
    assert all(old.items() <= new.items() for old, new in zip(old_opt["param_groups"], new_opt["param_groups"]))
    _train(reg, 3, 3, batch=3)                           # and it trains on
    assert reg.global_step == 6


def test_a_file_built_from_the_documented_layout_loads_into_the_right_places(tmp_path):
    """The layout of ``state_dict`` (its docstring), written with safetensors alone, with arbitrary values."""
    g = torch.Generator().manual_seed(7)
    config = _reg().config
    shapes = {"layers.0.weight": (16, 8), "layers.0.bias": (16,), "layers.1.weight": (8, 16), "layers.1.bias": (8,),
              "layers.2.weight": (2, 8), "layers.2.bias": (2,)}
    weights = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    adam = {f"{i}.{key}": torch.rand(s, generator=g) for i, s in enumerate(shapes.values())
            for key in ("exp_avg", "exp_avg_sq")}
    adam.update({f"{i}.step": torch.tensor(4.0) for i in range(len(shapes))})
    rng = torch.Generator().manual_seed(123).get_state()
    bank = torch.rand(3, 8, generator=g)
    groups = torch.optim.Adam([torch.zeros(s) for s in shapes.values()], lr=1e-2, weight_decay=1e-4).state_dict()
    last = {"attacker_ce_member": 0.625, "attacker_acc": 0.75, "denominator": 1.03125}
    tensors = {**{f"attacker.{k}": v for k, v in weights.items()}, **{f"optimizer.{k}": v for k, v in adam.items()},
               "rng.attacker": rng, "bank.nonmember": bank}
    metadata = {"meta.format": "smplora-state/1", "meta.config": config.to_json(),
                "meta.counters": json.dumps({"global_step": 4, "attacker_updates": 2, "attacker_steps": 4}),
                "meta.last": json.dumps(last), "meta.attacker": json.dumps({"in_features": 8, "device": "cpu"}),
                "meta.input_grid": "[2, 2]",
                "meta.optimizer": json.dumps({"param_groups": groups["param_groups"], "scalars": {},
                                              "indices": list(range(len(shapes)))})}
    path = tmp_path / "documented.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    reg = PrivacyRegularizer.load(path, load_entry_points=False)
    assert all(torch.equal(reg.attacker.state_dict()[k], v) for k, v in weights.items())
    opt = reg.optimizer.state_dict()["state"]
    assert all(torch.equal(opt[int(k.split(".")[0])][k.split(".")[1]], v) for k, v in adam.items())
    assert torch.equal(reg._generator.get_state(), rng) and torch.equal(reg._bank, bank)
    assert (reg.global_step, reg.attacker_updates, reg.attacker_steps, reg.input_grid) == (4, 2, 4, (2, 2))
    assert {k: v for k, v in reg.metrics().items() if k in last} == last
    # and the draws continue from the saved RNG state
    assert torch.equal(torch.rand(5, generator=reg._generator),
                       torch.rand(5, generator=torch.Generator().manual_seed(123)))
