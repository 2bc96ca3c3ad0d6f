"""The layout check of ai-toolkit: every piece the SMP-LoRA process uses, read from a checkout's source.

In CI against the stand-in (tests/ai_toolkit_standin); with AI_TOOLKIT_DIR set, against that real checkout
(tested: ostris/ai-toolkit 27a03a91). The live check on the classes (`check_classes`) is the same table.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from smplora_plugin.integrations.ai_toolkit.source import (
    PIECES,
    TESTED_COMMIT,
    AiToolkitVersionError,
    check_source,
    class_problems,
    source_problems,
)

STANDIN = Path(__file__).parent / "ai_toolkit_standin"
REAL = os.environ.get("AI_TOOLKIT_DIR")


def test_standin_has_every_piece():
    assert source_problems(STANDIN) == []


@pytest.mark.skipif(not REAL, reason="needs AI_TOOLKIT_DIR (an ostris/ai-toolkit checkout)")
def test_real_checkout_has_every_piece():
    assert source_problems(REAL) == []


@pytest.mark.parametrize("piece", [p for p in PIECES if p.uses or p.params], ids=lambda p: f"{p.cls}.{p.name}")
def test_each_piece_is_checked(tmp_path, piece):
    """Removing any one parameter or used line of any piece is reported, naming the piece and the commit."""
    root = Path(REAL) if REAL else STANDIN
    copy = tmp_path / "checkout"
    for p in {q.file for q in PIECES}:
        (copy / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / p, copy / p)
    path = copy / piece.file
    text = path.read_text()
    broken = piece.uses[0] if piece.uses else piece.params[0]
    drifted = text.replace(broken, broken[0] + "Z" + broken[1:] if piece.uses else f"{broken}_renamed")
    assert drifted != text
    path.write_text(drifted)
    problems = source_problems(copy)
    assert any(piece.label in p for p in problems), problems
    with pytest.raises(AiToolkitVersionError, match=TESTED_COMMIT):
        check_source(copy)


def test_live_class_check():
    class Trainer:
        def calculate_loss(self, noise_pred, noise, noisy_latents, timesteps, batch, mask_multiplier=1.0,
                           prior_pred=None):
            pass

    problems = class_problems(Trainer)
    assert any("SDTrainer.predict_noise is missing" in p for p in problems)
    assert not any("calculate_loss" in p for p in problems)

    class Older(Trainer):
        def calculate_loss(self, noise_pred, noise, timesteps, batch):
            pass

    assert any("calculate_loss takes no parameter noisy_latents, mask_multiplier, prior_pred" in p
               for p in class_problems(Older))
