import os

import pytest
import torch

# Entry points of whatever is installed must not leak into unrelated tests; tests that
# exercise entry points clear this variable themselves.
os.environ.setdefault("SMPLORA_DISABLE_PLUGINS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
