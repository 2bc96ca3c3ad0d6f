"""Small shared builders for the core tests."""

import pytest
import torch

from smplora_plugin import PrivacyRegularizer

SMALL = dict(hidden=(16, 8), feature_grid=4, attacker_lr=1e-2, seed=3, nonmember_every=1)


def small_reg(**kw):
    cfg = {**SMALL, **kw}
    return PrivacyRegularizer(**cfg)


class TinyDenoiser(torch.nn.Module):
    """A per-pixel linear 'denoiser' on (B, 2, 4, 4) inputs."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.net.weight.copy_(torch.randn(self.net.weight.shape, generator=g) * 0.5)
            self.net.bias.zero_()

    def forward(self, x):
        return self.net(x)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    noise = torch.randn(n, 2, 4, 4, generator=g)
    return x, noise


# audit tests: every default attack runs; small grids keep each audit about a second on a busy 2-core machine
TINY_AUDIT = {"draws": 1, "timesteps": [100, 300], "sima_timesteps": [10, 100], "pia_timesteps": [200], "n_boot": 50,
              "mlp_max_epochs": 5, "mlp_patience": 3, "cv_folds": 3}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for the test (imported into a test module, it applies to that module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_state(unet, seed=0, rank=4):
    """Add a peft LoRA (attention projections) with seeded random up-weights to ``unet``; return its state dict."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return get_peft_model_state_dict(unet)


def to_kohya(state, prefix="lora_unet_"):
    """A peft/diffusers LoRA state dict (``<module>.lora_A/B.weight``) in kohya's format (``lora_unet_<module>``)."""
    out = {}
    for k, v in state.items():
        mod, kind = k.rsplit(".lora_", 1)
        base = prefix + mod.replace(".", "_")
        if kind.startswith("A"):
            out[base + ".lora_down.weight"] = v.contiguous()
            out[base + ".alpha"] = torch.tensor(float(v.shape[0]))
        else:
            out[base + ".lora_up.weight"] = v.contiguous()
    return out
