"""The offline parts of the kohya fixture scripts (tokenizers and images), without sd-scripts: the model parts
need an sd-scripts checkout and 10+ GB of RAM and are exercised by the recorded runs in docs/kohya.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "kohya"

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_sdxl_fixture_tokenizers_and_images(tmp_path):
    from transformers import CLIPTokenizer

    r = subprocess.run([sys.executable, str(SCRIPTS / "make_random_sdxl.py"), str(tmp_path), "--skip_model",
                        "--images", "3", "--holdout", "2", "--reg", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizers" / name))
        ids = tok("a tiny photo 0", padding="max_length", max_length=77)["input_ids"]
        assert len(ids) == 77 and max(ids) < 49408        # fits the full-size CLIP embedding of SDXL
    assert len(list((tmp_path / "train" / "5_tiny").glob("*.png"))) == 3
    assert len(list((tmp_path / "holdout" / "1_tiny").glob("*.caption"))) == 2
    assert not (tmp_path / "sdxl_random_bf16.safetensors").exists()


def test_sdxl_fixture_needs_sd_scripts_for_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    r = subprocess.run([sys.executable, str(SCRIPTS / "make_random_sdxl.py"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--sd_scripts" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPTS / "make_random_sdxl.py"), str(tmp_path / "o"), "--sd_scripts",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not an sd-scripts checkout" in r.stderr
    assert not (tmp_path / "o").exists()            # refused before anything was written


def test_t5_tokenizer_has_t5_special_ids(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from make_random_flux_sd3 import make_t5_tokenizer
    finally:
        sys.path.remove(str(SCRIPTS))
    from transformers import T5TokenizerFast

    make_t5_tokenizer(tmp_path / "t5")
    tok = T5TokenizerFast.from_pretrained(str(tmp_path / "t5"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    out = tok("a tiny photo 3", max_length=24, padding="max_length", truncation=True)
    ids = out["input_ids"]
    assert len(ids) == 24 and ids[ids.index(1) + 1:] == [0] * (23 - ids.index(1)) and max(ids) < 32128
    assert tok.decode(ids, skip_special_tokens=True) == "a tiny photo 3"
