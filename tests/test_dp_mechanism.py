"""DPGradients: per-sample clipping, the noise, accumulation, the SGD update, both gradient methods."""

import math

import pytest
import torch
import torch.nn.functional as F

from smplora_plugin.dp import DPGradients, PoissonBatchSampler

from _helpers import one_thread  # noqa: F401


class TinyLoRA(torch.nn.Module):
    """A frozen linear layer plus a rank-2 LoRA (``lora_A``, ``lora_B``: the only trainable parameters)."""

    def __init__(self, seed=0, d_in=6, d_out=3, rank=2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(d_out, d_in, generator=g))
            self.base.bias.copy_(torch.randn(d_out, generator=g))
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, d_in, generator=g) * 0.3)
        self.lora_B = torch.nn.Parameter(torch.randn(d_out, rank, generator=g) * 0.3)

    def forward(self, x):
        return torch.tanh(self.base(x) + x @ self.lora_A.T @ self.lora_B.T)


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def data(n, seed=1, scale=None):
    """Inputs and targets; ``scale`` multiplies the targets per sample (large targets give large gradients)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)
    if scale is not None:
        y = y * torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
    return x, y


def make_dp(model, seed=0, **kw):
    args = dict(noise_multiplier=0.8, max_grad_norm=0.5, dataset_size=40, expected_batch_size=8,
                generator=torch.Generator().manual_seed(seed))
    args.update(kw)
    return DPGradients(model, **args)


def hand_grads(model, x, y):
    """Per-sample gradients of (lora_A, lora_B) by plain autograd, one sample at a time."""
    out = []
    for i in range(len(x)):
        out.append(torch.autograd.grad(loss_fn(model, x[i:i + 1], y[i:i + 1]), [model.lora_A, model.lora_B]))
    return out


def test_only_trainable_parameters_are_private():
    dp = make_dp(TinyLoRA())
    assert dp.names == ("lora_A", "lora_B")


@pytest.mark.parametrize("target", ["module", "params"])
def test_vmap_and_loop_agree(target):
    model = TinyLoRA()
    x, y = data(7, scale=[0.1, 5, 1, 20, 0.01, 3, 1])
    if target == "module":
        tgt, fn = model, loss_fn
    else:
        tgt = [model.lora_A, model.lora_B]

        def fn(params, xb, yb):  # the same loss with the parameters passed in
            a, b = params
            return F.mse_loss(torch.tanh(model.base(xb) + xb @ a.T @ b.T), yb)
    results = []
    for method in ("vmap", "loop"):
        dp = make_dp(tgt, method=method, max_grad_norm=0.3)
        norms = dp.accumulate(fn, x, y)
        results.append((norms, dp.clipped_sum))
    (n_v, s_v), (n_l, s_l) = results
    torch.testing.assert_close(n_v, n_l, rtol=1e-5, atol=1e-7)
    assert (n_v > 0.3).any() and (n_v < 0.3).any()          # some samples clipped, some not
    for a, b in zip(s_v, s_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_each_clipped_per_sample_gradient_is_within_the_bound(method):
    model = TinyLoRA()
    C = 0.25
    x, y = data(10, scale=[0.01, 0.05, 1, 10, 30, 0.02, 5, 100, 0.1, 2])
    hand = hand_grads(model, x, y)
    seen_small = seen_large = 0
    for i in range(len(x)):
        dp = make_dp(model, method=method, max_grad_norm=C)
        norm = dp.accumulate(loss_fn, x[i:i + 1], y[i:i + 1])[0]
        clipped = torch.cat([s.flatten() for s in dp.clipped_sum]).norm()
        raw = torch.cat([g.flatten() for g in hand[i]])
        assert norm.item() == pytest.approx(raw.norm().item(), rel=1e-5)
        assert clipped.item() <= C * (1 + 1e-6)
        if raw.norm() > C:                                   # clipped onto the bound, same direction
            seen_large += 1
            assert clipped.item() == pytest.approx(C, rel=1e-6)
            torch.testing.assert_close(torch.cat([s.flatten() for s in dp.clipped_sum]), raw * (C / raw.norm()))
        else:                                                # untouched
            seen_small += 1
            torch.testing.assert_close(torch.cat([s.flatten() for s in dp.clipped_sum]), raw)
    assert seen_small >= 2 and seen_large >= 2


def _noise_param(n=40000):
    return torch.nn.Parameter(torch.zeros(n))


def zero_grad_loss(params, x):
    """A loss whose gradient is exactly zero: the written gradient is the noise alone."""
    return (params[0] * 0.0).sum() + x.sum() * 0.0


@pytest.mark.parametrize("sigma,clip,micro", [(0.7, 0.3, 1), (2.5, 0.04, 4)])
def test_noise_std_is_sigma_times_clip_once_per_step(sigma, clip, micro):
    p = _noise_param()
    B = 6
    dp = DPGradients([p], noise_multiplier=sigma, max_grad_norm=clip, dataset_size=60, expected_batch_size=B,
                     generator=torch.Generator().manual_seed(5))
    x = torch.randn(2, 1)
    for _ in range(micro):                                   # gradient accumulation: noise must still be drawn once
        dp.accumulate(zero_grad_loss, x)
    assert dp.pending == 2 * micro
    dp.step()
    noise = p.grad * B
    n = noise.numel()
    # the sample std of n normals is within 2% of sigma*C with overwhelming probability (its sd is 0.35%)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(n)
    first = p.grad.clone()
    p.grad = None
    dp.step()
    assert not torch.equal(first, p.grad)                    # fresh noise every step
    assert dp.steps == 2


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_accumulated_micro_batches_equal_one_batch_of_their_union(method):
    x, y = data(12, scale=[0.1, 5, 1, 20] * 3)
    grads = []
    for parts in (1, 3):
        model = TinyLoRA()
        dp = make_dp(model, seed=11, method=method, expected_batch_size=12, dataset_size=60, sampling="fixed_batch")
        for chunk in range(parts):
            sl = slice(chunk * 12 // parts, (chunk + 1) * 12 // parts)
            dp.accumulate(loss_fn, x[sl], y[sl])
        dp.step()
        assert dp.steps == 1
        grads.append([p.grad for p in dp.params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_vmap_equals_unchunked():
    x, y = data(9, scale=[0.1, 5, 1] * 3)
    sums = []
    for chunk in (None, 2):
        dp = make_dp(TinyLoRA(), chunk_size=chunk)
        dp.accumulate(loss_fn, x, y)
        sums.append(dp.clipped_sum)
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_sgd_moves_the_lora_weights_by_exactly_the_clipped_and_noised_update(method):
    model = TinyLoRA()
    sigma, C, B, lr, seed = 0.6, 0.2, 5.0, 0.1, 3
    x, y = data(4, scale=[0.05, 8, 1, 30])                   # 4 samples drawn, expected batch 5 (Poisson)
    before = [model.lora_A.detach().clone(), model.lora_B.detach().clone()]
    base_before = model.base.weight.detach().clone()
    hand = hand_grads(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dp = DPGradients(model, noise_multiplier=sigma, max_grad_norm=C, sample_rate=0.25, expected_batch_size=B,
                     generator=torch.Generator().manual_seed(seed), method=method)
    dp.accumulate(loss_fn, x, y)
    opt.zero_grad(set_to_none=True)
    dp.step()
    opt.step()
    # the expected update, by hand: clip each sample's total norm, sum, add sigma*C*randn per parameter in order
    g = torch.Generator().manual_seed(seed)
    expected = []
    for k, p0 in enumerate(before):
        total = torch.zeros_like(p0)
        for gi in hand:
            norm = torch.cat([t.flatten() for t in gi]).norm()
            total += gi[k] * min(1.0, C / norm.item())
        noise = torch.randn(p0.shape, generator=g) * sigma * C
        expected.append(p0 - lr * (total + noise) / B)
    torch.testing.assert_close(model.lora_A.detach(), expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lora_B.detach(), expected[1], rtol=0, atol=1e-6)
    assert not torch.allclose(model.lora_A.detach(), before[0])
    assert torch.equal(model.base.weight, base_before)      # the frozen base is untouched
    assert dp.steps == 1 and dp.pending == 0 and dp.clipped_sum is None


def test_an_empty_poisson_batch_steps_with_noise_only():
    model = TinyLoRA()
    dp = make_dp(model)
    assert dp.accumulate(loss_fn, torch.zeros(0, 6), torch.zeros(0, 3)).numel() == 0
    dp.step()
    g = torch.Generator().manual_seed(0)
    for p in dp.params:
        torch.testing.assert_close(p.grad, torch.randn(p.shape, generator=g) * 0.8 * 0.5 / 8)
    assert dp.steps == 1


def test_poisson_sampler_draws_independent_variable_batches():
    N, q = 50, 0.1
    batches = list(PoissonBatchSampler(N, q, steps=2000, generator=torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    # Binomial(50, 0.1): mean 5, sd 2.12; over 2000 batches the mean is within 0.25 (5.3 sd of the mean)
    assert sizes.mean().item() == pytest.approx(N * q, abs=0.25)
    assert sizes.var().item() == pytest.approx(N * q * (1 - q), rel=0.15)
    assert (sizes == 0).any()                                # empty batches happen (P = 0.9^50 per batch)
    counts = torch.zeros(N)
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < N for i in b)
        counts[b] += 1
    assert counts.min() > 0 and counts.max() < 2000 * q * 1.5
    again = list(PoissonBatchSampler(N, q, steps=2000, generator=torch.Generator().manual_seed(0)))
    assert again == batches
    assert len(PoissonBatchSampler(N, q)) == 10


def test_poisson_sampler_resumes_from_the_generator_state():
    g = torch.Generator().manual_seed(4)
    full = list(PoissonBatchSampler(30, 0.2, steps=6, generator=torch.Generator().manual_seed(4)))
    first = list(PoissonBatchSampler(30, 0.2, steps=2, generator=g))
    state = g.get_state()
    g2 = torch.Generator()
    g2.set_state(state)
    rest = list(PoissonBatchSampler(30, 0.2, steps=4, generator=g2))
    assert first + rest == full


def test_vmap_and_loop_agree_on_a_peft_lora():
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"],
                                                      init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.2)
    x, y = torch.randn(6, 5), torch.randn(6, 2) * torch.tensor([[0.1], [10], [1], [5], [0.2], [3]])
    sums = []
    for method in ("vmap", "loop"):
        dp = make_dp(model, method=method, max_grad_norm=0.1)
        assert all("lora_" in n for n in dp.names) and len(dp.names) == 4
        dp.accumulate(loss_fn, x, y)
        sums.append(dp.clipped_sum)
    for a, b in zip(*sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
