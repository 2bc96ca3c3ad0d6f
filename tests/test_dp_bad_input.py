"""Every bad DP input is refused with a DPError (a SmploraError) naming the fix, before any state changes."""

import pytest
import torch
import torch.nn.functional as F
from test_dp_mechanism import TinyLoRA, data, loss_fn

from smplora_plugin import SmploraError
from smplora_plugin.dp import DPError, DPGradients, PoissonBatchSampler

from _helpers import one_thread  # noqa: F401

GOOD = dict(noise_multiplier=1.0, max_grad_norm=1.0, dataset_size=100, expected_batch_size=10)


def test_dp_error_is_a_smplora_error():
    assert issubclass(DPError, SmploraError) and issubclass(DPError, ValueError)


@pytest.mark.parametrize("change,message", [
    (dict(noise_multiplier=0.0), "noise_multiplier=0.0 must be a finite number > 0"),
    (dict(noise_multiplier=-1.0), "no privacy guarantee"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0 must be"),
    (dict(max_grad_norm=-0.1), "the clip C"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm"),
    (dict(delta=0.0), "outside \\(0, 1\\)"),
    (dict(delta=1.0), "outside \\(0, 1\\)"),
    (dict(delta=-1e-5), "outside \\(0, 1\\)"),
    (dict(delta=2), "outside \\(0, 1\\)"),
    (dict(target_epsilon=3.0, steps=100), "give exactly one of noise_multiplier= .* got both"),
    (dict(noise_multiplier=None), "got neither"),
    (dict(noise_multiplier=None, target_epsilon=3.0), "needs steps="),
    (dict(noise_multiplier=None, target_epsilon=3.0, steps=0), "needs steps="),
    (dict(noise_multiplier=None, target_epsilon=-1.0, steps=10), "target_epsilon=-1.0 must be"),
    (dict(steps=100), "steps= is the planning horizon of target_epsilon="),
    (dict(noise_multiplier=None, target_epsilon=1e-5, steps=10_000, expected_batch_size=100),
     "not reachable in 10000 steps .* raise target_epsilon, plan fewer steps"),
    (dict(accountant="gdp"), "accountant='gdp' is not one of"),
    (dict(sampling="uniform"), "sampling='uniform' is not one of"),
    (dict(method="functorch"), "method='functorch' is not one of"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive int"),
    (dict(dataset_size=None), "give two of sample_rate="),
    (dict(expected_batch_size=None, dataset_size=None, sample_rate=0.1), "give two of"),
    (dict(sample_rate=0.2), "is not expected_batch_size=10"),
    (dict(dataset_size=None, sample_rate=1.5), "sample_rate=1.5 is above 1"),
    (dict(expected_batch_size=200), "larger than dataset_size"),
    (dict(dataset_size=10.5), "dataset_size=10.5 must be a positive int"),
    (dict(expected_batch_size=-2), "expected_batch_size=-2 must be"),
    (dict(sampling="fixed_batch", expected_batch_size=None, dataset_size=30, sample_rate=0.25),
     "needs a whole expected_batch_size"),
    (dict(generator=123), "generator must be a torch.Generator"),
    (dict(regularizer=object()), "regularizer must be a PrivacyRegularizer"),
])
def test_bad_options_are_refused(change, message):
    kw = {**GOOD, **change}
    if "opacus" in message or "reachable" in message:
        pytest.importorskip("opacus")
    with pytest.raises(DPError, match=message):
        DPGradients(TinyLoRA(), **kw)



@pytest.mark.parametrize("target,message", [
    (torch.nn.Linear(2, 2).requires_grad_(False), "no trainable parameters"),
    ([], "no trainable parameters"),
    (42, "must be a torch.nn.Module or an iterable of parameters"),
    ([torch.zeros(3)], "cannot take per-sample gradients"),
    ([torch.zeros(3, requires_grad=True) * 2], "cannot take per-sample gradients"),
    ([torch.zeros(3, dtype=torch.long)], "cannot take per-sample gradients"),
    ("twice", "listed twice"),
])
def test_parameters_without_per_sample_gradients_are_refused(target, message):
    if target == "twice":
        p = torch.nn.Parameter(torch.zeros(2))
        target = [p, p]
    with pytest.raises(DPError, match=message):
        DPGradients(target, **GOOD)


def _dp(model=None, **kw):
    return DPGradients(TinyLoRA() if model is None else model, **{**GOOD, **kw})


def _assert_untouched(dp):
    assert dp.pending == 0 and dp.clipped_sum is None and dp.steps == 0


class _CountingModel(TinyLoRA):
    """Updates a buffer in place in its forward: vmap cannot run it, the loop can."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_bad_batches_are_refused_before_anything_accumulates(method):
    dp = _dp(method=method)
    x, y = data(4)
    cases = [
        ((loss_fn,), "needs the batch as tensors"),
        ((loss_fn, x, [1, 2]), "needs the batch as tensors"),
        ((loss_fn, x, y[:3]), "same batch size on dimension 0"),
        ((loss_fn, x, torch.tensor(1.0)), "same batch size"),
        ((lambda m, a, b: (m(a) - b) ** 2, x, y), "must return that sample's scalar loss"),
        ((lambda m, a, b: F.mse_loss(m(a), b) * float("nan"), x, y), "NaN or Inf"),
    ]
    for args, message in cases:
        with pytest.raises(DPError, match=message):
            dp.accumulate(*args)
        _assert_untouched(dp)


def test_a_loss_that_ignores_the_parameters_is_refused():
    dp = _dp(method="loop")
    x, y = data(4)
    with pytest.raises(DPError, match="does not depend on the DP parameters"):
        dp.accumulate(lambda m, a, b: F.mse_loss(m(a).detach(), b), x, y)
    _assert_untouched(dp)


def test_a_model_vmap_cannot_run_names_the_loop_method():
    model = _CountingModel()
    dp = _dp(model)
    x, y = data(4)
    with pytest.raises(DPError, match="method='loop'"):
        dp.accumulate(loss_fn, x, y)
    _assert_untouched(dp)
    dp.accumulate(loss_fn, x, y, method="loop")                # the fix works
    assert dp.pending == 4 and model.calls.item() == 4


def test_batchnorm_in_training_mode_is_refused():
    class WithBN(TinyLoRA):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(super().forward(x))

    model = WithBN()
    model.bn.requires_grad_(False)
    dp = _dp(model)
    x, y = data(4)
    with pytest.raises(DPError, match="BatchNorm in training mode.*GroupNorm"):
        dp.accumulate(loss_fn, x, y)
    _assert_untouched(dp)
    model.bn.eval()
    dp.accumulate(loss_fn, x, y)
    assert dp.pending == 4


def test_step_refuses_a_non_private_gradient_and_changes_nothing():
    model = TinyLoRA()
    dp = _dp(model)
    x, y = data(4)
    dp.accumulate(loss_fn, x, y)
    loss_fn(model, x, y).backward()                            # a plain, non-private gradient on the LoRA
    rng = dp.generator.get_state().clone()
    with pytest.raises(DPError, match="zero_grad\\(set_to_none=True\\) before dp.step"):
        dp.step()
    assert dp.steps == 0 and dp.pending == 4 and torch.equal(dp.generator.get_state(), rng)


def test_fixed_batches_must_hold_exactly_the_batch_the_accountant_counts():
    model = TinyLoRA()
    dp = _dp(model, sampling="fixed_batch", expected_batch_size=8, dataset_size=80)
    x, y = data(8)
    dp.accumulate(loss_fn, x[:4], y[:4])                       # half a logical batch
    rng = dp.generator.get_state().clone()
    with pytest.raises(DPError, match="accumulated 4 samples.*drop_last=True.*sampling='poisson'"):
        dp.step()
    assert dp.steps == 0 and torch.equal(dp.generator.get_state(), rng)
    dp.accumulate(loss_fn, x[4:], y[4:])                       # the rest of it: now the step is honoured
    dp.step()
    assert dp.steps == 1
    for p in dp.params:
        p.grad = None
    dp.accumulate(loss_fn, x, y)
    dp.accumulate(loss_fn, x[:1], y[:1])                       # one too many
    with pytest.raises(DPError, match="accumulated 9 samples"):
        dp.step()


@pytest.mark.parametrize("kw,message", [
    (dict(dataset_size=0, sample_rate=0.1), "dataset_size=0 must be a positive int"),
    (dict(dataset_size=10, sample_rate=0.0), "sample_rate=0.0 must be in \\(0, 1\\]"),
    (dict(dataset_size=10, sample_rate=1.2), "sample_rate=1.2 must be in"),
    (dict(dataset_size=10, sample_rate=0.1, steps=-1), "steps=-1 must be a non-negative int"),
    (dict(dataset_size=10, sample_rate=0.1, generator="seed"), "generator must be a torch.Generator"),
])
def test_bad_sampler_options_are_refused(kw, message):
    with pytest.raises(DPError, match=message):
        PoissonBatchSampler(**kw)
