"""examples/diffusers/patch_official.py: its lines are the ones PATCH.md / PATCH_SDXL.md / PATCH_FLUX.md show, the
forward moves into a function intact, and a script of another layout is refused before anything is written.
(The official scripts themselves run in tests/test_diffusers_official.py, with DIFFUSERS_EXAMPLES_DIR.)"""

import importlib.util
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[1] / "examples" / "diffusers"


@pytest.fixture(scope="module")
def patcher():
    spec = importlib.util.spec_from_file_location("_patch_official_unit", DIR / "patch_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind,doc", [("sd1", "PATCH.md"), ("sdxl", "PATCH_SDXL.md"), ("flux", "PATCH_FLUX.md")])
def test_patch_files_show_every_line_the_patcher_adds(patcher, kind, doc):
    shown = set((DIR / doc).read_text(encoding="utf-8").splitlines())
    for snippet in patcher.SNIPPETS[kind]:
        for line in snippet.splitlines():
            if line.strip():
                assert "+" + line in shown, f"{doc} lacks the line {line.strip()!r}"


def test_move_forward_dedents_the_block_and_calls_it(patcher):
    src = ("def main():\n"
           "    x = 1\n"
           "    for epoch in range(3):\n"
           "        for step, batch in enumerate(data):\n"
           "                # start\n"
           "                y = batch + x\n"
           "\n"
           "                z = y * 2\n"
           "                loss = z\n")
    out = patcher.move_forward(src, "                # start\n", "                z = y * 2\n",
                               "    for epoch in range(3):\n", "    def f(batch):\n", "        return z\n",
                               "                z = f(batch)\n")
    assert out == ("def main():\n"
                   "    x = 1\n"
                   "    def f(batch):\n"
                   "        # start\n"
                   "        y = batch + x\n"
                   "\n"
                   "        z = y * 2\n"
                   "        return z\n"
                   "    for epoch in range(3):\n"
                   "        for step, batch in enumerate(data):\n"
                   "                z = f(batch)\n"
                   "                loss = z\n")
    ns = {"data": [5]}
    exec(compile(out.replace("                loss = z\n", "                loss = z\n    return loss\n"), "t", "exec"), ns)
    assert ns["main"]() == 12


def test_a_script_of_another_layout_is_refused(patcher, tmp_path, capsys):
    with pytest.raises(patcher.PatchError, match="is_compiled_module.*PATCH_SDXL.md"):
        patcher.patch_sdxl("import torch\n")
    src = tmp_path / "train.py"
    src.write_text("import torch\n")
    dest = tmp_path / "out.py"
    assert patcher.main(["flux", str(src), str(dest)]) == 1
    assert "anchor" in capsys.readouterr().err and not dest.exists()
    with pytest.raises(SystemExit):
        patcher.main(["sdxl", str(src), str(src)])
    assert "dest must differ" in capsys.readouterr().err
