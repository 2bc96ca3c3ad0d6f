"""Quantile regression, GSA and the generation attack: golden GSA features, detection, chance, capabilities,
and the real targets (tiny diffusers UNet with a peft LoRA, the demo's TinyLDM)."""

import math

import numpy as np
import pytest
import torch

from smplora_plugin.audit import AuditConfig, AuditError, AuditSamples, run_audit
from smplora_plugin.audit.attacks import GenerationAttack, GSAAttack
from smplora_plugin.audit.attacks.generation import dct_matrix, ddim_sample
from smplora_plugin.audit.attacks.gsa import gradient_norms, gsa_pairs
from smplora_plugin.audit.engine import ScoreContext
from smplora_plugin.audit.synthetic import MemorizingTarget, linear_alphas_cumprod, synthetic_captions, synthetic_pool
from smplora_plugin.audit.target import has_capability

N = 200
CFG = {"n_boot": 200, "draws": 2, "timesteps": [50, 150, 300, 500], "batch_size": 100}
NEW = ["quantile", "gsa", "generation"]


class GradFormulaTarget:
    """Known-formula nonlinear denoiser with two LoRA modules (float64 throughout).

    ``eps(z, t) = tanh(W1 z) + sqrt(1 - abar_t) sin(W2 z)``, ``Wj = W0j + Bj Aj``; images are the latents.
    """

    prediction_type = "epsilon"

    def __init__(self, dim: int = 16, rank: int = 2, seed: int = 0, T: int = 1000):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64) * 0.4  # noqa: E731
        self.W0 = [r(dim, dim), r(dim, dim)]
        self.params = {f"layer{j}.lora_{k}": torch.nn.Parameter(r(rank, dim) if k == "A" else r(dim, rank))
                       for j in (1, 2) for k in ("A", "B")}
        self.num_train_timesteps = T
        self.alphas_cumprod = linear_alphas_cumprod(T)

    def encode(self, images):
        return images.float()

    def condition(self, captions):
        return None

    def _eps(self, z_t, t):
        z = z_t.double().flatten(1)
        c = (1 - self.alphas_cumprod.double()[torch.as_tensor(t).long().reshape(-1).expand(z.shape[0])]).sqrt()[:, None]
        p = self.params
        w1 = self.W0[0] + p["layer1.lora_B"] @ p["layer1.lora_A"]
        w2 = self.W0[1] + p["layer2.lora_B"] @ p["layer2.lora_A"]
        return (torch.tanh(z @ w1.T) + c * torch.sin(z @ w2.T)).reshape(z_t.shape)

    @torch.no_grad()
    def eps(self, z_t, t, cond, *, adapter=True):
        return self._eps(z_t, t).float()

    def adapter_parameters(self):
        return dict(self.params)

    def eps_grad(self, z_t, t, cond):
        with torch.enable_grad():
            return self._eps(z_t, t)


class MixLoRATarget(MemorizingTarget):
    """A memoriser whose "LoRA" is one scalar: ``eps = eps_prior + s (eps_memorised - eps_prior)``, ``s = 1``."""

    def __init__(self, members, **kw):
        super().__init__(members, strength=1.0, **kw)
        self.s = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def adapter_parameters(self):
        return {"mix.lora_scale": self.s}

    def eps_grad(self, z_t, t, cond):
        mem = self.eps(z_t.float(), t, cond, adapter=True).double()
        prior = self.eps(z_t.float(), t, cond, adapter=False).double()
        with torch.enable_grad():
            return prior + self.s * (mem - prior)


def _split(pool, caps=None):
    h = pool.shape[0] // 2
    return (AuditSamples(pool[:h], None if caps is None else caps[:h]),
            AuditSamples(pool[h:], None if caps is None else caps[h:]))


def test_gsa_features_match_the_closed_form():
    target = GradFormulaTarget()
    images = synthetic_pool(6, shape=(1, 4, 4), seed=3)
    ctx = ScoreContext(target, images, None, AuditConfig(draws=3, seed=5), progress=False)
    norms, modules = gradient_norms(ctx)
    assert modules == ["layer1", "layer2"]
    pairs = gsa_pairs(ctx)
    assert len(pairs) == 4 and [m for _, m in pairs] == [0, 1, 2, 0]
    P = {k: v.detach().numpy() for k, v in target.params.items()}
    W = [target.W0[0].numpy() + P["layer1.lora_B"] @ P["layer1.lora_A"],
         target.W0[1].numpy() + P["layer2.lora_B"] @ P["layer2.lora_A"]]
    abar = target.alphas_cumprod.double().numpy()
    K, D = len(pairs), 16
    for i in range(images.shape[0]):
        z0 = images[i].double().flatten().numpy()
        G1, G2 = np.zeros((D, D)), np.zeros((D, D))
        for t, m in pairs:
            e = ctx.noise[m].double().flatten().numpy()
            z = math.sqrt(abar[t]) * z0 + math.sqrt(1 - abar[t]) * e
            c = math.sqrt(1 - abar[t])
            u1, u2 = W[0] @ z, W[1] @ z
            r = np.tanh(u1) + c * np.sin(u2) - e
            G1 += np.outer(2 / (K * D) * r * (1 - np.tanh(u1) ** 2), z)
            G2 += np.outer(2 / (K * D) * r * c * np.cos(u2), z)
        want = []
        for G, j in ((G1, 1), (G2, 2)):
            gB = G @ P[f"layer{j}.lora_A"].T
            gA = P[f"layer{j}.lora_B"].T @ G
            want.append(math.sqrt((gA ** 2).sum() + (gB ** 2).sum()))
        np.testing.assert_allclose(norms[i], want, rtol=1e-6)
    # the parameters' requires_grad is restored
    assert all(p.requires_grad for p in target.params.values())


def test_gsa_exposes_a_memoriser_and_sits_at_chance_without_signal():
    pool = synthetic_pool(N, seed=0)
    mem, non = _split(pool)
    r = run_audit(MixLoRATarget(pool[:N // 2]), mem, non, attacks=["gsa"], config=CFG, progress=False,
                  num_threads=1, load_plugins=False).attacks["gsa"]
    assert r["auc"] >= 0.95 and r["auc_ci95"][0] > 0.6, r["auc"]
    assert r["calibration"]["lora_modules"] == 1
    pool = synthetic_pool(N, shape=(1, 4, 4), seed=1)
    mem, non = _split(pool)
    r = run_audit(GradFormulaTarget(), mem, non, attacks=["gsa"], config=CFG, progress=False, num_threads=1,
                  load_plugins=False).attacks["gsa"]
    lo, hi = r["auc_ci95"]
    assert lo <= 0.5 <= hi and abs(r["auc"] - 0.5) < 0.2, (r["auc"], r["auc_ci95"])


def test_gsa_skipped_by_default_and_refused_explicitly_without_gradients():
    pool = synthetic_pool(40, seed=2)
    mem, non = _split(pool)
    target = MemorizingTarget(pool[:20])
    assert not has_capability(target, "gradients")
    rep = run_audit(target, mem, non, config={**CFG, "timesteps": [100]}, progress=False, num_threads=1,
                    load_plugins=False, attacks=None)
    assert "gsa" not in rep.attacks and "quantile" in rep.attacks and "generation" in rep.attacks
    assert "gradients" in rep.info["skipped_attacks"]["gsa"]
    with pytest.raises(AuditError, match="gradients capability"):
        run_audit(target, mem, non, attacks=["loss", "gsa"], config=CFG, progress=False, load_plugins=False)


def test_generation_without_decode_uses_latents_and_finds_captioned_members():
    pool = synthetic_pool(N, seed=4)
    caps = synthetic_captions(N, seed=4)
    mem, non = _split(pool, caps)
    target = MemorizingTarget(pool[:N // 2], captions=caps[:N // 2])
    assert not has_capability(target, "decode")
    r = run_audit(target, mem, non, attacks=[GenerationAttack(per_caption=2, steps=6)], config=CFG, progress=False,
                  num_threads=1, load_plugins=False).attacks["generation"]
    assert r["auc"] >= 0.95
    assert r["calibration"]["candidate"] in {"latents", "random-conv features", "dct"}
    assert set(r["curves_eval_auc"]["uncalibrated_lora_distance"]) == {"latents", "random-conv features", "dct"}


def test_ddim_sampler_reaches_the_single_memorised_point():
    x = synthetic_pool(1, seed=9)
    target = MemorizingTarget(x)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = ddim_sample(target, noise, None, target.alphas_cumprod.double(), 8, adapter=True)
    assert torch.allclose(out, x.expand_as(out), atol=1e-3)
    base = ddim_sample(target, noise, None, target.alphas_cumprod.double(), 8, adapter=False)
    assert (base - x).abs().max() > 0.5  # the base model's prior does not produce the member


def test_dct_matrix_is_orthonormal():
    m = dct_matrix(7).double()
    assert torch.allclose(m @ m.T, torch.eye(7, dtype=torch.float64), atol=1e-6)


def _small_attacks():
    return ["quantile", GSAAttack(timesteps=(200, 500)), GenerationAttack(per_caption=2, steps=3)]


def test_new_attacks_on_a_tiny_diffusers_unet_with_peft_lora():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig

    from smplora_plugin.audit import DiffusersTarget
    from smplora_plugin.tiny_sd import build_components

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = build_components()
        unet = parts["unet"]
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        target = DiffusersTarget(unet, parts["scheduler"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                                 tokenizer=parts["tokenizer"])
        assert has_capability(target, "gradients") and has_capability(target, "decode")
        named = target.adapter_parameters()
        modules = {n.split(".lora_")[0] for n in named}
        grads_before = {n: p.requires_grad for n, p in named.items()}
        imgs = torch.rand((16, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
        caps = [f"a handwritten digit {i % 2}" for i in range(16)]
        z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(2))
        t, c = torch.full((2,), 300), target.condition(caps[:2])
        before = target.eps(z, t, c)
        rep = run_audit(target, AuditSamples(imgs[:8], caps[:8]), AuditSamples(imgs[8:], caps[8:]),
                        attacks=_small_attacks(), config={"timesteps": [100, 300], "draws": 1, "n_boot": 50},
                        progress=False, num_threads=1, load_plugins=False)
        assert set(rep.attacks) == set(NEW)
        for r in rep.attacks.values():
            assert 0.0 <= r["auc"] <= 1.0
        assert rep.attacks["gsa"]["calibration"]["lora_modules"] == len(modules) > 2
        assert rep.attacks["generation"]["calibration"]["candidate"] in {"pixels", "random-conv features", "dct"}
        assert torch.allclose(target.eps(z, t, c), before)  # GSA changed no weights and left the adapter on
        assert {n: p.requires_grad for n, p in target.adapter_parameters().items()} == grads_before
        assert target.decode(target.encode(imgs[:2])).shape == (2, 3, 32, 32)
    finally:
        torch.set_num_threads(threads)


def test_new_attacks_on_the_demo_target():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from smplora_plugin.demo.model import TinyLDM, caption_for
    from smplora_plugin.demo.target import TinyLDMTarget

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = TinyLDM()
        model.add_lora(rank=2)
        target = TinyLDMTarget(model)
        imgs = torch.rand((16, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
        caps = [caption_for(i % 3) for i in range(16)]
        assert torch.equal(target.decode(target.encode(imgs)), imgs)
        rep = run_audit(target, AuditSamples(imgs[:8], caps[:8]), AuditSamples(imgs[8:], caps[8:]),
                        attacks=_small_attacks(), config={"timesteps": [100, 300], "draws": 1, "n_boot": 50},
                        progress=False, num_threads=1, load_plugins=False)
        assert set(rep.attacks) == set(NEW)
        n_modules = len({n.split(".lora_")[0] for n in target.adapter_parameters()})
        assert rep.attacks["gsa"]["calibration"]["lora_modules"] == n_modules > 2
        assert rep.passes["gsa"] == 16 * 2 and rep.passes["generation"] == 2 * 3 * 2 * 3
    finally:
        torch.set_num_threads(threads)
