"""annotate(): smplora.* keys added to an existing LoRA file, everything else kept, atomic."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from smplora_plugin import PrivacyConfig, SmploraError, annotate, read_privacy_metadata

from _helpers import small_reg


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    tensors = {"lora_unet_down.lora_up.weight": torch.randn(8, 4), "lora_unet_down.alpha": torch.tensor(4.0),
               "half": torch.randn(3, dtype=torch.float16)}
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_output_name": "my_lora", "format": "pt"})
    return path, tensors


def _read(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_annotate_keeps_every_key_and_tensor(lora):
    path, tensors = lora
    written = annotate(path, config=PrivacyConfig(alpha=0.2), metrics={"attacker_acc": 0.6})
    header, got = _read(path)
    assert header["ss_network_dim"] == "4" and header["ss_output_name"] == "my_lora" and header["format"] == "pt"
    assert header["smplora.method"] == "smp-lora" and '"alpha": 0.2' in header["smplora.config"]
    assert written == read_privacy_metadata(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_regularizer_annotate_writes_live_metrics(lora):
    path, _ = lora
    reg = small_reg()
    reg.step(torch.tensor(1.0, requires_grad=True), torch.rand(2, 2, 4, 4, requires_grad=True), torch.rand(2, 2, 4, 4))
    reg.annotate(path, extra={"smplora.note": "run 7"})
    md = read_privacy_metadata(path)
    assert md["smplora.note"] == "run 7" and '"step": 1.0' in md["smplora.metrics"]


def test_annotate_refuses_foreign_keys_and_bad_files_without_touching_them(lora, tmp_path):
    path, _ = lora
    before = path.read_bytes()
    with pytest.raises(SmploraError, match="namespace"):
        annotate(path, extra={"ss_network_dim": "999"})
    assert path.read_bytes() == before
    with pytest.raises(SmploraError, match="no such file"):
        annotate(tmp_path / "missing.safetensors", config=PrivacyConfig())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(SmploraError, match="not a readable"):
        annotate(junk, config=PrivacyConfig())
    assert junk.read_bytes() == b"definitely not safetensors"


def test_annotate_failure_during_write_leaves_original(lora, monkeypatch):
    path, _ = lora
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        annotate(path, config=PrivacyConfig())
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
def test_annotate_refuses_read_only_file(lora):
    path, _ = lora
    path.chmod(0o444)
    with pytest.raises(SmploraError, match="not writable"):
        annotate(path, config=PrivacyConfig())
