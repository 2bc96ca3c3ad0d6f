"""One error tree: every error class of the package is a SmploraError (a ValueError), and the raises that
were bare ValueErrors are now the subclass that names the subsystem, with the same message."""

import pytest
import torch

from smplora_plugin import PrivacyConfig, errors
from smplora_plugin.dp.errors import DPError
from smplora_plugin.integrations.comfyui import images
from smplora_plugin.integrations.comfyui.layout import ComfyTrainingError

CORE = [errors.ConfigError, errors.FeatureError, errors.StateError, errors.HoldoutError, errors.PluginError,
        errors.InputError]


@pytest.mark.parametrize("cls", CORE + [DPError, images.FolderError, ComfyTrainingError])
def test_every_error_class_is_a_smplora_error(cls):
    assert issubclass(cls, errors.SmploraError) and issubclass(cls, ValueError)


def test_subclasses_keep_their_builtin_and_family():
    assert issubclass(ComfyTrainingError, RuntimeError)  # it was a RuntimeError before it joined the tree
    assert issubclass(images.FolderError, errors.InputError)


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, r"batch_size must be a whole number >= 1, got 0\."),
                                           ({"batch_size": 4, "step": -1}, r"step must be a whole number >= 0")])
def test_privacy_rows_refuses_bad_arguments_with_a_config_error(kwargs, match):
    with pytest.raises(errors.ConfigError, match=match):
        PrivacyConfig().privacy_rows(**kwargs)


def test_comfyui_folder_errors_list_the_shared_extensions(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"")  # not counted: the audit folders are not searched recursively
    with pytest.raises(images.FolderError, match=r"has 1 image\(s\) \(\.png, \.jpg, \.jpeg, \.webp, \.bmp\)"):
        images.list_images(str(tmp_path), "member", minimum=2)
    assert images.list_images(str(tmp_path), "member", minimum=1) == [tmp_path / "a.png"]
    with pytest.raises(errors.InputError, match="does not exist"):
        images.list_images(str(tmp_path / "missing"), "member")


def test_state_file_with_non_string_header_is_a_state_error(tmp_path):
    from safetensors.torch import save

    blob = bytearray(save({"x": torch.zeros(1)}, metadata={"a": "b"}))
    size = int.from_bytes(blob[:8], "little")
    header = bytes(blob[8:8 + size]).replace(b'"a":"b"', b'"a":1  ')
    assert len(header) == size
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(blob[:8]) + header + bytes(blob[8 + size:]))
    from smplora_plugin.state import read_state

    with pytest.raises(errors.StateError, match="is not a readable smplora state file"):
        read_state(path)
