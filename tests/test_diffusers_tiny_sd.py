"""The tiny Stable-Diffusion builders and the digits image folder (smplora_plugin.tiny_sd)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from smplora_plugin.errors import ConfigError  # noqa: E402
from smplora_plugin.holdout import content_hash  # noqa: E402
from smplora_plugin.tiny_sd import (  # noqa: E402
    TinySDConfig,
    build_components,
    build_tokenizer,
    unique_digit_indices,
    write_digit_images,
    write_tokenizer_files,
)


def test_tokenizer_built_here_knows_the_caption_words(tmp_path):
    tok = build_tokenizer(max_length=12)
    ids = tok("a handwritten digit 7", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(ids) == 12
    assert tok.convert_ids_to_tokens(ids[:6]) == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "7</w>",
                                                  "<|endoftext|>"]
    assert "zebra" in tok.decode(tok("Zebra").input_ids, skip_special_tokens=True)   # unknown words: byte pieces
    vocab_path, merges_path = write_tokenizer_files(tmp_path)
    vocab = json.loads(vocab_path.read_text())
    assert len(vocab) == len(tok) and merges_path.read_text().startswith("#version")


def test_digit_folder_has_distinct_images_and_captions(tmp_path):
    a = write_digit_images(tmp_path / "a", n=6, start=0, size=16)
    b = write_digit_images(tmp_path / "b", n=6, start=6, size=16)
    hashes = {content_hash(p) for p in a + b}
    assert len(hashes) == 12                                   # disjoint ranges never share content
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in a]
    assert all(r["text"].startswith("a handwritten digit ") for r in rows)
    assert (tmp_path / "a" / (a[0].stem + ".txt")).read_text().strip() == rows[0]["text"]
    from PIL import Image

    with Image.open(a[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    assert len(unique_digit_indices()) > 1700
    with pytest.raises(ConfigError, match="multiple of 8"):
        write_digit_images(tmp_path / "c", n=1, size=12)


def test_components_follow_the_config_and_are_seeded():
    cfg = TinySDConfig(unet_channels=(8, 16), unet_norm_groups=4, attention_head_dim=4, vae_channels=(8, 8),
                       cross_attention_dim=16, text_layers=1, text_heads=2, text_intermediate=16, max_length=8)
    a, b = build_components(cfg), build_components(cfg)
    assert a["unet"].config.cross_attention_dim == 16 and a["unet"].config.sample_size == 16
    assert a["text_encoder"].config.hidden_size == 16 and a["vae"].config.latent_channels == 4
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all((sa[k] == sb[k]).all() for k in sa)
    with pytest.raises(ConfigError, match="divisible"):
        build_components(TinySDConfig(unet_channels=(10, 16)))
