"""The built wheel installs the shims from ./integrations as smplora_plugin.integrations.*."""

import os
import subprocess
import sys
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
    """The wheel, unpacked into a folder of its own without its dependencies, imports from there with this
    interpreter's torch etc. Works in a virtualenv and in a system interpreter alike (a new venv would see
    the base interpreter's packages, not this environment's)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    "--target", str(target), str(wheel)], check=True)
    code = ("import smplora_plugin, smplora_plugin.integrations, smplora_plugin.integrations.kohya as k,"
            "smplora_plugin.integrations.diffusers as d;"
            "print(smplora_plugin.__file__); print(k.__file__); print(d.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    files = res.stdout.split()
    assert all(f.startswith(str(target)) for f in files), files
    assert files[1].endswith("smplora_plugin/integrations/kohya/__init__.py")


def _requirements():
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return ([Requirement(r) for r in project["dependencies"]],
            {name: [Requirement(r) for r in reqs] for name, reqs in extras.items()})


# pins of kohya sd-scripts' requirements.txt (v0.10.1, 48d368fa; torch as installed here): installing the
# core into a kohya environment must change none of them
KOHYA_PINS = {"diffusers": "0.32.1", "transformers": "4.54.1", "accelerate": "1.6.0", "safetensors": "0.4.5",
              "huggingface-hub": "0.34.3", "torch": "2.13.0"}


def test_core_requirements_keep_kohya_pins():
    core, extras = _requirements()
    for req in core:
        if req.name in KOHYA_PINS:
            assert req.specifier.contains(KOHYA_PINS[req.name]), (req, KOHYA_PINS[req.name])
    # the diffusers extra accepts kohya's versions too (one environment for both trainers)
    for req in extras["diffusers"]:
        if req.name in KOHYA_PINS:
            assert req.specifier.contains(KOHYA_PINS[req.name]), (req, KOHYA_PINS[req.name])


def test_diffusers_extra_holds_what_the_documented_use_needs():
    _, extras = _requirements()
    names = {r.name for r in extras["diffusers"]}
    # the official train_text_to_image_lora.py loads data with `datasets` and logs to tensorboard by default
    assert {"diffusers", "peft", "accelerate", "transformers", "datasets", "tensorboard"} <= names
    # torchvision must match the installed torch exactly, so it is documented, not an extra: an unpinned
    # torchvision in an extra would make pip replace torch with a newer (multi-GB) build
    assert "torchvision" not in {r.name for reqs in extras.values() for r in reqs}
    assert "torchvision==" in (ROOT / "README.md").read_text()


def test_dp_extra_keeps_kohya_pins():
    """``[dp]`` is Opacus alone, and Opacus's own requirements accept every pin of a kohya venv (its torch
    2.14.1 and the 2.13.0 here), so installing the extra there adds packages and replaces none."""
    import importlib.metadata

    from packaging.requirements import Requirement

    _, extras = _requirements()
    assert [r.name for r in extras["dp"]] == ["opacus"]
    (opacus,) = extras["dp"]
    installed = importlib.metadata.version("opacus")
    assert opacus.specifier.contains(installed), (opacus, installed)
    pins = {**KOHYA_PINS, "torch": "2.14.1"}
    own = [Requirement(r) for r in importlib.metadata.requires("opacus") or []]
    own = [r for r in own if r.marker is None]
    assert {"torch", "numpy"} <= {r.name for r in own}
    for req in own:
        for version in {pins.get(req.name), KOHYA_PINS.get(req.name)} - {None}:
            assert req.specifier.contains(version), (req, version)
