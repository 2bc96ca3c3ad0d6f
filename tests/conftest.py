import os

import pytest
import torch

from _comfyui import LAYOUTS, StandinComfy

# Entry points of whatever is installed must not leak into unrelated tests; tests that
# exercise entry points clear this variable themselves.
os.environ.setdefault("SMPLORA_DISABLE_PLUGINS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=LAYOUTS)
def comfy(tmp_path, request):
    """The ComfyUI stand-in (tests/comfyui_standin) at each supported layout: 783545f6, the current one, and
    3cd7b32f. ``_comfyui.NOW`` limits a test to the current layout."""
    env = StandinComfy(tmp_path / "comfy", layout=request.param)
    try:
        yield env
    finally:
        env.close()
