"""examples/diffusers/patch_official.py: its lines are the ones PATCH.md / PATCH_SDXL.md / PATCH_FLUX.md show, the
forward moves into a function intact, and a script of another layout is refused before anything is written,
with every anchor that is missing, repeated or moved and the known layout. With DIFFUSERS_EXAMPLES_DIR (the
``examples`` folder of a diffusers checkout) the official scripts are patched too, and refused once an anchor is
renamed or moved. (The patched scripts run in tests/test_diffusers_official.py.)"""

import importlib.util
import os
import re
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
    with_return = out.replace("                loss = z\n", "                loss = z\n    return loss\n")
    exec(compile(with_return, "t", "exec"), ns)
    assert ns["main"]() == 12


def test_a_script_of_another_layout_is_refused(patcher, tmp_path, capsys):
    with pytest.raises(patcher.PatchError, match="(?s)is_compiled_module.*PATCH_SDXL.md"):
        patcher.patch_sdxl("import torch\n")
    src = tmp_path / "train.py"
    src.write_text("import torch\n")
    dest = tmp_path / "out.py"
    assert patcher.main(["flux", str(src), str(dest)]) == 1
    assert "anchor" in capsys.readouterr().err and not dest.exists()
    with pytest.raises(SystemExit):
        patcher.main(["sdxl", str(src), str(src)])
    assert "dest must differ" in capsys.readouterr().err


KINDS = ["sd1", "sdxl", "flux"]


def _skeleton(patcher, kind):
    """A stand-in with the known layout's anchors only, in order, separated by filler lines."""
    return "".join(a if a.endswith("\n") else a + "\n" for a in patcher.ANCHORS[kind] for a in (a, "    pass\n"))


@pytest.mark.parametrize("kind", KINDS)
def test_the_known_layout_passes_the_layout_check(patcher, kind):
    patcher.check_layout(kind, _skeleton(patcher, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_a_renamed_anchor_is_refused_naming_it_and_the_known_layout(patcher, kind, tmp_path, capsys):
    anchor = patcher.ANCHORS[kind][-1]    # the save_lora_weights(...) call, as a newer script might rename it
    src = _skeleton(patcher, kind).replace(anchor, anchor.replace("save_lora_weights", "save_lora_adapter"))
    with pytest.raises(patcher.PatchError) as exc:
        patcher.PATCHERS[kind](src)
    msg = str(exc.value)
    assert f"anchor not found: {patcher._show(anchor)}" in msg and msg.count("  - ") == 1
    assert 'check_min_version("0.40.0.dev0")' in msg and "58eb52c0" in msg
    assert patcher.SCRIPTS[kind][1] in msg and "nothing was written" in msg
    (tmp_path / "train.py").write_text(src)
    assert patcher.main([kind, str(tmp_path / "train.py"), str(tmp_path / "out.py")]) == 1
    assert "not found" in capsys.readouterr().err and not (tmp_path / "out.py").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_moved_or_repeated_anchor_is_refused(patcher, kind):
    anchors = patcher.ANCHORS[kind]
    src = _skeleton(patcher, kind)
    moved = src.replace(anchors[2], "").replace(anchors[5], anchors[5] + "    pass\n" + anchors[2])
    with pytest.raises(patcher.PatchError, match="anchor moved: " + re.escape(patcher._show(anchors[2]))):
        patcher.check_layout(kind, moved)
    with pytest.raises(patcher.PatchError, match="found 2 times"):
        patcher.check_layout(kind, src + anchors[1])


@pytest.mark.parametrize("kind", KINDS)
def test_every_problem_is_listed_at_once(patcher, kind):
    with pytest.raises(patcher.PatchError) as exc:
        patcher.check_layout(kind, "import torch\n")
    assert str(exc.value).count("  - anchor not found: ") == len(patcher.ANCHORS[kind])


ATTACH_DP = "reg.attach(accelerator, holdout, model=unet, optimizer=optimizer, train_dataloader=train_dataloader)"
PREPARE = "unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare("


def test_sd1_attach_hands_dp_sgd_the_prepared_model_optimizer_and_dataloader(patcher):
    """DP noise needs no extra line: the attach line after accelerator.prepare passes the three objects DP-SGD uses
    (the delegate's own code then does the DP work; see tests/test_diffusers_dp.py)."""
    src = "".join(a if a.endswith("\n") else a + "\n" for a in patcher.ANCHORS["sd1"]
                  for a in (a, "                pass\n" if a == patcher.LATENTS else "    pass\n"))
    src = src.replace(patcher.AFTER_PREPARE, f"    {PREPARE}\n        unet, optimizer, train_dataloader, lr_scheduler"
                      f"\n    )\n{patcher.AFTER_PREPARE}") + "        )\n"     # closes save_lora_weights(
    out = patcher.patch_sd1(src)
    assert out.count(ATTACH_DP) == 1 and out.index(PREPARE) < out.index(ATTACH_DP)
    assert out.index(ATTACH_DP) < out.index(patcher.AFTER_PREPARE)


EXAMPLES = os.environ.get("DIFFUSERS_EXAMPLES_DIR")


@pytest.mark.skipif(not EXAMPLES, reason="set DIFFUSERS_EXAMPLES_DIR to diffusers' examples folder")
@pytest.mark.parametrize("kind", KINDS)
def test_the_official_script_is_patched_and_an_edited_one_refused(patcher, kind):
    rel = patcher.SCRIPTS[kind][0]
    src = (Path(EXAMPLES) / rel.split("/", 1)[1]).read_text(encoding="utf-8")
    out = patcher.PATCHERS[kind](src)
    compile(out, rel, "exec")
    assert out.count("reg.step(") == 1 and out.count("reg.annotate(") == 1
    if kind == "sd1":   # the official script's names after accelerator.prepare: what DP-SGD needs
        assert out.count(ATTACH_DP) == 1 and out.index(PREPARE) < out.index(ATTACH_DP)
    renamed = src.replace(patcher.GATHER if kind != "flux" else patcher.FLUX_LOGS, "                # (logging)\n")
    with pytest.raises(patcher.PatchError, match="not found: "):
        patcher.PATCHERS[kind](renamed)
    first, later = patcher.ANCHORS[kind][2], patcher.ANCHORS[kind][4]
    moved = src.replace(first, "", 1).replace(later, later + first, 1)
    with pytest.raises(patcher.PatchError, match="anchor moved: " + re.escape(patcher._show(first))):
        patcher.PATCHERS[kind](moved)
