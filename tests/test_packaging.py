"""The built wheel installs the shims from ./integrations as smplora_plugin.integrations.*."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (whl,) = out.glob("smplora_plugin-*.whl")
    return whl


def test_wheel_maps_every_integration_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in (ROOT / "integrations").rglob("*.py"):
        rel = src.relative_to(ROOT / "integrations").as_posix()
        assert f"smplora_plugin/integrations/{rel}" in names, rel
    for src in (ROOT / "smplora_plugin").rglob("*.py"):
        assert src.relative_to(ROOT).as_posix() in names
    assert not any(n.startswith(("integrations/", "tests/", "examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "smplora = smplora_plugin.cli:main" in text
    assert "smplora-kohya = smplora_plugin.integrations.kohya.launcher:main" in text


def test_wheel_installs_and_imports_outside_the_source_tree(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # install the wheel into the venv without touching dependencies (torch etc. come from the system)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    "--prefix", str(env_dir), "--ignore-installed", str(wheel)], check=True)
    code = ("import smplora_plugin, smplora_plugin.integrations, smplora_plugin.integrations.kohya as k;"
            "print(smplora_plugin.__file__); print(k.__file__)")
    res = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    files = res.stdout.split()
    assert all(str(env_dir) in f for f in files), files
    assert files[1].endswith("smplora_plugin/integrations/kohya/__init__.py")
