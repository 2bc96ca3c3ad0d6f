"""Golden tests: SimA, PIA, SecMI and CLiD scores of a known nonlinear denoiser, computed by hand.

The hand computations below use numpy and the formula of ``FormulaTarget`` only (its parameters
are read from the target), never the audit engine.
"""

import numpy as np
import pytest
import torch

from smplora_plugin.audit.attacks import CLiDAttack, PIAAttack, SecMIAttack, SimAAttack
from smplora_plugin.audit.attacks.clid import clid_features, clid_losses, reduce_caption
from smplora_plugin.audit.attacks.pia import pia_statistic
from smplora_plugin.audit.attacks.secmi import secmi_statistic
from smplora_plugin.audit.attacks.sima import sima_statistic
from smplora_plugin.audit.engine import AuditConfig, ScoreContext
from smplora_plugin.audit.synthetic import FormulaTarget, synthetic_pool

N = 12
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
CAPTIONS = [
    "a red cat on the mat", "a blue dog in a park", "sunset", "two green birds on a wire at noon",
    "a photo of a small grey house with a garden and a wooden fence by the lake under a cloudy sky",
    "", "an old car", "a big yellow bus", "a bowl of fruit", "the tall tower", "a child with a kite",
    "snow on the hills",
]


@pytest.fixture(scope="module")
def setup():
    target = FormulaTarget((1, 4, 4), seed=3)
    images = synthetic_pool(N, (1, 4, 4), seed=11)
    cfg = AuditConfig(seed=5, batch_size=5, draws=2)
    ctx = ScoreContext(target, images, list(CAPTIONS), cfg, progress=False)
    p = {k: getattr(target, k).numpy() for k in ("W0", "dW", "b")}
    words = {w: target.word_vector(w).numpy() for c in CAPTIONS for w in c.split()}
    return ctx, images.double().flatten(1).numpy(), p, words, cfg


def _f(p, words, z, t, caption=None, adapter=True):
    """The formula: sqrt(1 - a) z + sqrt(a) tanh(W z + b + v(caption))."""
    a = ABAR[t]
    W = p["W0"] + p["dW"] if adapter else p["W0"]
    v = sum((words[w] for w in caption.split()), np.zeros_like(p["b"])) if caption else 0.0
    return np.sqrt(1 - a) * z + np.sqrt(a) * np.tanh(W @ z + p["b"] + v)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_sima_by_hand(setup):
    ctx, Z, p, words, _ = setup
    cands = SimAAttack().candidates(ctx)
    assert list(cands) == [f"t={t}" for t in range(0, 200, 10)]
    for t in range(0, 200, 10):
        hand = np.array([np.sum(_f(p, words, z, t, c) ** 4) for z, c in zip(Z, CAPTIONS)])
        _close(-cands[f"t={t}"], hand)


def test_pia_by_hand(setup):
    ctx, Z, p, words, _ = setup
    cands = PIAAttack().candidates(ctx)
    assert list(cands) == [f"t={t}" for t in range(10, 501, 10)]
    for t in (10, 120, 370, 500):
        hand = []
        for z, c in zip(Z, CAPTIONS):
            e0 = _f(p, words, z, 0, c)
            zt = np.sqrt(ABAR[t]) * z + np.sqrt(1 - ABAR[t]) * e0
            hand.append(np.mean(np.abs(_f(p, words, zt, t, c) - e0) ** 4))
        _close(-cands[f"t={t}"], np.array(hand))


def _ddim(z, s, u, e):
    x0 = (z - np.sqrt(1 - ABAR[s]) * e) / np.sqrt(ABAR[s])
    return np.sqrt(ABAR[u]) * x0 + np.sqrt(1 - ABAR[u]) * e


def _secmi_hand(p, words, z0, c, t_sec, k=10, adapter=True):
    """SecMI_stat as in the official code: invert 0 -> t_sec - k, one DDIM step up, one back."""
    z = z0
    for s in range(0, t_sec - k, k):
        z = _ddim(z, s, s + k, _f(p, words, z, s, c, adapter))
    s = t_sec - k
    up = _ddim(z, s, t_sec, _f(p, words, z, s, c, adapter))
    back = _ddim(up, t_sec, s, _f(p, words, up, t_sec, c, adapter))
    return np.mean((back - z) ** 2)


def test_secmi_by_hand_and_distinct_from_sima(setup):
    ctx, Z, p, words, _ = setup
    cands = SecMIAttack().candidates(ctx)
    assert list(cands) == ["t_sec=100", "t_sec=150", "t_sec=200"]
    for t_sec in (100, 150, 200):
        hand = np.array([_secmi_hand(p, words, z, c, t_sec) for z, c in zip(Z, CAPTIONS)])
        _close(-cands[f"t_sec={t_sec}"], hand)
    base = np.array([_secmi_hand(p, words, z, c, 100, adapter=False) for z, c in zip(Z, CAPTIONS)])
    _close(secmi_statistic(ctx, adapter=False)[:, 0], base)
    # one shared inversion path: t = 0, 10, ..., 200 for all three candidates, per model
    assert ctx.passes["secmi"] == 2 * 21 * N
    # a nonlinear denoiser: SecMI's ranking is not SimA's at any t (a linear one could not tell them apart)
    sima = SimAAttack().candidates(ctx)

    def rank(v):
        return np.argsort(np.argsort(v))

    for s in cands.values():
        for v in sima.values():
            assert not np.array_equal(rank(s), rank(v))
            assert abs(np.corrcoef(rank(s), rank(v))[0, 1]) < 0.95


def test_clid_by_hand(setup):
    ctx, Z, p, words, cfg = setup
    noise = torch.randn((cfg.draws, 1, 4, 4), generator=torch.Generator().manual_seed(cfg.seed)).double()
    noise = noise.flatten(1).numpy()
    pairs = [(440, 0), (450, 1), (460, 0)]

    def loss(z, t, m, c):
        zt = np.sqrt(ABAR[t]) * z + np.sqrt(1 - ABAR[t]) * noise[m]
        return np.mean((_f(p, words, zt, t, c) - noise[m]) ** 2)

    hand = []
    for z, cap in zip(Z, CAPTIONS):
        ws = cap.split()
        full = [loss(z, t, m, cap) for t, m in pairs]
        imp = {w: loss(z, 450, 1, " ".join(ws[:w] + ws[w + 1:])) - full[1] for w in range(min(16, len(ws)))}
        row = [np.mean(full)]
        for frac in (0.3, 0.5, 0.7):
            k = min(len(imp), max(1, int(np.floor(frac * len(ws) + 0.5))))
            drop = sorted(imp, key=lambda w: (-imp[w], w))[:k]
            red = " ".join(x for i, x in enumerate(ws) if i not in drop)
            row.append(np.mean([loss(z, t, m, red) - f for (t, m), f in zip(pairs, full)]))
        row.append(np.mean([loss(z, t, m, "") - f for (t, m), f in zip(pairs, full)]))
        hand.append(row)
    _close(clid_features(ctx), np.array(hand))
    # the threshold attack mixes the gap and the loss with 11 alpha values
    out = CLiDAttack().run(ctx, np.arange(N), np.array([1, 0] * (N // 2)))
    assert out.chosen["candidate"] in {f"alpha={a:g}" for a in np.round(np.arange(11) * 0.1, 1)}


def test_reduce_caption_removes_most_important_words_first():
    imp = np.array([0.1, 5.0, -1.0, 2.0, 2.0])
    assert reduce_caption("a b c d e", imp, 0.2) == "a c d e"  # 1 word: the most important
    assert reduce_caption("a b c d e", imp, 0.3) == "a c e"  # 1.5 -> 2 words; tie d/e -> the earlier
    assert reduce_caption("a b c d e", imp, 0.5) == "a c"  # 2.5 -> 3 words
    assert reduce_caption("a b c d e", imp, 0.7) == "c"  # 3.5 -> 4 words: a (0.1) before c (-1)
    assert reduce_caption("single", np.array([0.3]), 0.3) == ""  # at least one word goes
    # words beyond the ranked ones (importance -inf / absent) are never removed
    assert reduce_caption("a b c d", np.array([1.0, 0.0]), 0.7) == "c d"


def test_flip_average_is_the_mean_over_the_image_and_its_mirror():
    target = FormulaTarget((1, 4, 4), seed=4)
    images = synthetic_pool(6, (1, 4, 4), seed=2)
    caps = CAPTIONS[:6]
    small = dict(seed=1, draws=2, timesteps=(100, 400), pia_timesteps=(50, 300), sima_timesteps=(0, 20))
    both = ScoreContext(target, images, caps, AuditConfig(**small, flip_average=True), progress=False)
    one = ScoreContext(target, images, caps, AuditConfig(**small), progress=False)
    mirror = ScoreContext(target, images.flip(-1), caps, AuditConfig(**small), progress=False)
    quantities = (ScoreContext.loss_grid, ScoreContext.loss_map, sima_statistic, pia_statistic, secmi_statistic,
                  clid_losses)
    for q in quantities:
        got, a, b = q(both), q(one), q(mirror)
        for g_, a_, b_ in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, a, b))):
            _close(g_, (a_ + b_) / 2)
            assert not np.allclose(a_, b_)  # the mirror really is a different input here
    assert both.passes == {k: 2 * v for k, v in one.passes.items()}
