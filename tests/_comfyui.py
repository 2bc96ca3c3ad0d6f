"""Helpers for the ComfyUI node-pack tests: load the stand-in (or nothing) and clean up after."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

STANDIN = Path(__file__).parent / "comfyui_standin"
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths")
PACK_MODULES = ("smplora_plugin.integrations.comfyui.nodes", "smplora_plugin.integrations.comfyui.target",
                "smplora_plugin.integrations.comfyui.fit")


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name in PACK_MODULES or any(name == m or name.startswith(m + ".") for m in COMFY_MODULES):
            del sys.modules[name]


LAYOUTS = ("783545f6", "3cd7b32f")  # the ComfyUI commits whose nodes_train the stand-in imitates (newest first)


class StandinComfy:
    """The stand-in on sys.path with its folders under ``base``; ``close()`` undoes everything.

    ``layout`` picks which ComfyUI's ``comfy_extras.nodes_train`` the pack sees: the current one
    (783545f6) or the older 3cd7b32f (``nodes_train_3cd7b32f`` put in its place).
    """

    def __init__(self, base: Path, layout: str = LAYOUTS[0]):
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
        _drop_modules()
        sys.path.insert(0, str(STANDIN))
        self.folder_paths = importlib.import_module("folder_paths")
        self.folder_paths.set_base(base)
        self.base = Path(base)
        self.layout = layout
        self.nodes_train = importlib.import_module("comfy_extras.nodes_train")
        if layout != LAYOUTS[0]:
            old = importlib.import_module(f"comfy_extras.nodes_train_{layout}")
            sys.modules["comfy_extras.nodes_train"] = old
            sys.modules["comfy_extras"].nodes_train = old
            self.nodes_train = old
        self.model_mod = importlib.import_module("comfy.standin_model")
        self.nodes = importlib.import_module("smplora_plugin.integrations.comfyui.nodes")

    def close(self) -> None:
        sys.path.remove(str(STANDIN))
        _drop_modules()

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    def written(self):
        """Every file under the stand-in's output and loras folders."""
        return sorted(str(p.relative_to(self.base)) for d in ("output", "models/loras")
                      for p in (self.base / d).rglob("*") if p.is_file())


# limits a test to the current layout (the ``comfy`` fixture of conftest.py runs each supported one)
NOW = pytest.mark.parametrize("comfy", [LAYOUTS[0]], indirect=True)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``(n, size, size, 3)`` in [0, 1], ComfyUI's IMAGE layout."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=gen)


def latent(vae, imgs) -> dict:
    return {"samples": vae.encode(imgs)}


def conditioning(clip, text: str) -> list:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def train_inputs(model, members: dict, positive: list, holdout: dict, holdout_positive: list, layout=None,
                 **over) -> dict:
    """Keyword inputs of Train LoRA (SMP-LoRA), as lists (is_input_list); ``layout``: a TrainLoraNode to fit."""
    values = dict(model=model, latents=members, positive=positive, batch_size=2, grad_accumulation_steps=1, steps=6,
                  learning_rate=1e-2, rank=2, optimizer="AdamW", loss_function="MSE", seed=3, training_dtype="fp32",
                  lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False, existing_lora="[None]",
                  quantized_backward=False, checkpoint_depth=1, offloading=False, bucket_mode=False, bypass_mode=False,
                  holdout_latents=holdout, holdout_positive=holdout_positive, privacy_preset="robust",
                  privacy_objective="smp", privacy_alpha=0.0)
    values.update(over)
    if layout is not None:  # only the inputs this layout's Train LoRA has (ComfyUI drops unknown ones too)
        known = {i.id for i in layout.define_schema().inputs}
        values = {k: v for k, v in values.items() if k in known or k.startswith(("holdout", "privacy"))}
    return {k: (v if k in ("latents", "holdout_latents") and isinstance(v, list) else [v]) for k, v in values.items()}


def write_pngs(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder
