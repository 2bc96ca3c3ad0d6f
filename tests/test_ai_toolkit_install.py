"""smplora-ai-toolkit install / uninstall / check on copies of the ai-toolkit stand-in."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from smplora_plugin.integrations.ai_toolkit import install as inst
from smplora_plugin.integrations.ai_toolkit.source import AiToolkitVersionError

_HARNESS = Path(__file__).parent / "ai_toolkit_standin" / "harness.py"
_spec = importlib.util.spec_from_file_location("aitk_harness", _HARNESS)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


@pytest.fixture
def checkout(tmp_path):
    return harness.checkout_copy(tmp_path / "ai-toolkit")


def test_install_is_idempotent_and_uninstall_removes_only_its_file(checkout):
    target = checkout / "extensions" / "smplora.py"
    assert inst.install(checkout).startswith("installed")
    text = target.read_text()
    assert inst.MARKER in text and "smplora_plugin.integrations.ai_toolkit.extension" in text
    assert inst.install(checkout).startswith("already installed")
    target.write_text(text.replace("0.1.0", "0.0.9"))          # an older version of our own file: updated
    assert inst.install(checkout).startswith("updated") and target.read_text() == text
    (checkout / "extensions" / "__pycache__").mkdir()
    (checkout / "extensions" / "__pycache__" / "smplora.cpython-311.pyc").write_bytes(b"x")
    assert inst.uninstall(checkout).startswith("removed")
    assert not target.exists() and not list((checkout / "extensions" / "__pycache__").iterdir())
    assert (checkout / "extensions" / ".keep").exists()
    assert inst.uninstall(checkout).startswith("not installed")


def test_foreign_file_is_never_overwritten_or_removed(checkout):
    target = checkout / "extensions" / "smplora.py"
    target.write_text("# someone else's extension\n")
    with pytest.raises(inst.InstallError, match="not written by smplora-ai-toolkit"):
        inst.install(checkout)
    with pytest.raises(inst.InstallError, match="not written by smplora-ai-toolkit"):
        inst.uninstall(checkout)
    assert target.read_text() == "# someone else's extension\n"


def test_not_a_checkout_is_refused(tmp_path):
    (tmp_path / "toolkit").mkdir()
    with pytest.raises(inst.InstallError, match="not an ai-toolkit checkout"):
        inst.install(tmp_path)
    assert not (tmp_path / "extensions").exists()
    with pytest.raises(inst.InstallError, match="not a folder"):
        inst.install(tmp_path / "missing")


def test_drifted_checkout_is_refused_before_writing(checkout):
    sdt = checkout / "extensions_built_in" / "sd_trainer" / "SDTrainer.py"
    sdt.write_text(sdt.read_text().replace("def calculate_loss(", "def compute_loss("))
    with pytest.raises(AiToolkitVersionError, match="27a03a91") as err:
        inst.install(checkout)
    assert "SDTrainer.calculate_loss is missing" in str(err.value)
    assert not (checkout / "extensions" / "smplora.py").exists()


def test_cli_exit_codes(checkout, tmp_path, capsys):
    assert inst.main(["check", str(checkout)]) == 0
    assert "every piece" in capsys.readouterr().out
    assert inst.main(["install", str(tmp_path / "nothing")]) == 2
    base = checkout / "jobs" / "process" / "BaseSDTrainProcess.py"
    base.write_text(base.read_text().replace("self.progress_bar.set_postfix_str(", "self.progress_bar.set_postfix("))
    assert inst.main(["install", str(checkout)]) == inst.EXIT_VERSION
    assert "set_postfix_str" in capsys.readouterr().err


def test_written_module_without_the_package_fails_only_our_process(checkout, tmp_path):
    """In a Python without smplora-plugin, ai-toolkit still discovers its extensions; our process type then
    refuses, saying what to install."""
    inst.install(checkout)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import builtins; real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name.startswith('smplora_plugin'):\n"
            "        raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "import importlib; (ext,) = importlib.import_module('extensions.smplora').AI_TOOLKIT_EXTENSIONS\n"
            "print(ext.uid)\n"
            "try:\n    ext.get_process()(0, None, {})\nexcept ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(checkout)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "sd_trainer_smplora"
    assert "refused:" in out.stdout and "pip install smplora-plugin" in out.stdout
