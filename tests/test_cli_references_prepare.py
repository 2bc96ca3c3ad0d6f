"""`smplora references prepare` and `smplora audit --references DIR`: layouts, script, finished references, errors."""

import json
import os
import shlex
from pathlib import Path

import pytest

from smplora_plugin import cli

KOHYA = "accelerate launch train_network.py --seed {i} --train_data_dir {data} --output_dir {out}"


def _pool(folder, n=8, start=0, **kw):
    from smplora_plugin.tiny_sd import write_digit_images

    return write_digit_images(folder, n=n, start=start, **kw)


def _prepare(pool, out, *extra, n=4, layout="kohya", command=KOHYA):
    return cli.main(["references", "prepare", "--pool", str(pool), "--n", str(n), "--layout", layout,
                     "--out", str(out), "--command", command, *extra])


def _members(path):
    return json.loads(Path(path).read_text())["sets"]


def test_kohya_layout_script_and_manifests(tmp_path, capsys):
    pool = tmp_path / "pool"
    images = _pool(pool, metadata_jsonl=False)
    out = tmp_path / "refs"
    assert _prepare(pool, out) == 0
    assert "train_references.sh" in capsys.readouterr().out
    index = json.loads((out / "references.json").read_text())
    assert [r["name"] for r in index["references"]] == ["ref_00", "ref_01", "ref_02", "ref_03"]
    count = {p.resolve(): 0 for p in images}
    for r in range(4):
        sub = out / f"ref_{r:02d}" / "data" / "1_pool"  # kohya's <repeats>_<name>
        got = sorted(sub.glob("*.png"))
        assert got and all(p.is_symlink() for p in got)
        assert all(p.with_suffix(".txt").is_file() for p in got)  # captions next to the images
        sets = _members(out / f"ref_{r:02d}" / "manifest.json")
        member = sorted(e["id"] for e in sets["member"])
        assert member == sorted(str(p.resolve()) for p in got)
        assert {e["id"] for e in sets["nonmember"]} == {str(p.resolve()) for p in images} - set(member)
        for p in got:
            count[p.resolve()] += 1
        assert (out / f"ref_{r:02d}" / "out").is_dir()
    assert set(count.values()) == {2}  # balanced: every pool image trains exactly half of the references
    script = (out / "train_references.sh").read_text().splitlines()
    cmds = [s for s in script if s.startswith("accelerate")]
    assert len(cmds) == 4 and os.access(out / "train_references.sh", os.X_OK)
    for r, c in enumerate(cmds):
        words = shlex.split(c)
        assert words[words.index("--seed") + 1] == str(r)
        assert words[words.index("--train_data_dir") + 1] == str((out / f"ref_{r:02d}" / "data").resolve())
        assert words[words.index("--output_dir") + 1] == str((out / f"ref_{r:02d}" / "out").resolve())


def test_imagefolder_layout_copies_and_kohya_pool(tmp_path):
    pool = tmp_path / "pool"
    _pool(pool / "3_dog", n=4, caption_files=False, metadata_jsonl=False)
    _pool(pool / "5_cat", n=4, start=4, caption_files=True, metadata_jsonl=False)
    out = tmp_path / "refs"
    assert _prepare(pool, out, "--copy", layout="imagefolder", n=2,
                    command="python examples/diffusers/train_text_to_image_lora.py --train_data_dir {data} "
                            "--output_dir {out}") == 0
    data = out / "ref_00" / "data"
    files = sorted(data.iterdir())
    assert files and all(p.is_file() and not p.is_symlink() for p in files)  # flat copies
    assert not any(p.is_dir() for p in files)
    # the kohya layout keeps the pool's repeat folders
    out2 = tmp_path / "refs2"
    assert _prepare(pool, out2, n=2) == 0
    subs = {p.name for r in ("ref_00", "ref_01") for p in (out2 / r / "data").iterdir()}
    assert subs == {"3_dog", "5_cat"}


def test_metadata_captions_are_carried(tmp_path):
    pool = tmp_path / "pool"
    _pool(pool, n=6, caption_files=False, metadata_jsonl=True)
    out = tmp_path / "refs"
    assert _prepare(pool, out, layout="imagefolder", n=2) == 0
    rows = [json.loads(s) for s in (out / "ref_00" / "data" / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {p.name for p in (out / "ref_00" / "data").glob("*.png")}
    assert all(r["text"].startswith("a handwritten digit") for r in rows)
    out2 = tmp_path / "refs2"
    assert _prepare(pool, out2, layout="kohya", n=2) == 0  # kohya reads captions from NAME.txt
    txt = sorted((out2 / "ref_00" / "data" / "1_pool").glob("*.txt"))
    assert txt and txt[0].read_text().startswith("a handwritten digit")


def _refused(capsys, argv_fn, out, *needles):
    rc = argv_fn()
    err = capsys.readouterr().err
    assert rc == 2, err
    for s in needles:
        assert s in err, err
    return err


def test_bad_input_is_refused_before_any_file(tmp_path, capsys):
    pool = tmp_path / "pool"
    _pool(pool, n=6)
    out = tmp_path / "refs"
    (tmp_path / "empty").mkdir()
    _refused(capsys, lambda: _prepare(tmp_path / "empty", out), out, "is empty", "--pool")
    _refused(capsys, lambda: _prepare(tmp_path / "nowhere", out), out, "does not exist")
    _refused(capsys, lambda: _prepare(pool, out, n=0), out, "--n 0", "at least 2")
    _refused(capsys, lambda: _prepare(pool, out, n=1), out, "--n 1")
    _refused(capsys, lambda: _prepare(pool, out, n=64), out, "too large for a pool of 6", "--n ")
    _refused(capsys, lambda: _prepare(pool, out, command="train.py --output_dir {out}"), out, "{data}")
    _refused(capsys, lambda: _prepare(pool, out, command="train.py --train_data_dir {data}"), out, "{out}")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _refused(capsys, lambda: _prepare(pool, out), out, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _prepare(pool, tmp_path / "fresh") == 0  # an empty or new folder is fine


def test_find_lora_picks_the_final_file(tmp_path):
    from smplora_plugin.audit.references_cli import find_lora
    from smplora_plugin.audit.target import AuditError

    d = tmp_path / "o"
    d.mkdir()
    assert find_lora(d) is None
    (d / "ref-000001.safetensors").write_bytes(b"")
    assert find_lora(d).name == "ref-000001.safetensors"
    (d / "ref.safetensors").write_bytes(b"")
    assert find_lora(d).name == "ref.safetensors"  # kohya: the final save has no -NNNNNN suffix
    (d / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert find_lora(d).name == "pytorch_lora_weights.safetensors"  # diffusers' name
    e = tmp_path / "e"
    e.mkdir()
    (e / "a.safetensors").write_bytes(b"")
    (e / "b.safetensors").write_bytes(b"")
    with pytest.raises(AuditError, match="several LoRA files"):
        find_lora(e)


# ---------------------------------------------------------------------------------------------------------
# smplora audit --references DIR (tiny diffusers pipeline; "training" = saving seeded LoRAs into out/)

FAST = json.dumps({"timesteps": [100, 300], "n_boot": 100})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from smplora_plugin.tiny_sd import save_tiny_pipeline

    root = tmp_path_factory.mktemp("refs_audit")
    base = save_tiny_pipeline(root / "base")
    _pool(root / "pool", n=16)
    members, nonmembers = root / "members", root / "nonmembers"
    members.mkdir()
    nonmembers.mkdir()
    for i, p in enumerate(sorted((root / "pool").glob("*.png"))):
        dst = (members if i < 8 else nonmembers) / p.name
        dst.symlink_to(p)
        dst.with_suffix(".txt").symlink_to(p.with_suffix(".txt"))
    return {"root": root, "base": base, "pool": root / "pool", "members": members, "nonmembers": nonmembers,
            "target": _lora(base, root / "target", 0)}


def _lora(base, folder, seed, rank=4, name="lora.safetensors"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from _helpers import lora_state

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora_state(unet, seed, rank),
                                              weight_name=name)
    return Path(folder) / name


def _audit(ws, out, refs, *extra):
    return ["audit", "--no-progress", "--threads", "1", "--base-model", str(ws["base"]), "--lora", str(ws["target"]),
            "--members", str(ws["members"]), "--nonmembers", str(ws["nonmembers"]), "--out", str(out),
            "--draws", "1", "--config", FAST, "--no-captions", "--attacks", "loss,lira_offline,rmia",
            "--references", str(refs), *extra]


def test_audit_picks_up_the_finished_references(ws, tmp_path, capsys):
    refs = tmp_path / "refs"
    assert _prepare(ws["pool"], refs, n=4) == 0
    for r in range(3):  # ref_03 not trained yet
        _lora(ws["base"], refs / f"ref_{r:02d}" / "out", r + 1, name="ref.safetensors")
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(_audit(ws, out, refs)) == 0
    err = capsys.readouterr().err
    assert "ref_03" in err and "not trained yet" in err
    rep = json.loads((out / "report.json").read_text())
    assert rep["info"]["references"]["count"] == 3
    assert {"lira_offline", "rmia"} <= set(rep["attacks"])


def test_audit_references_errors(ws, tmp_path, capsys):
    refs = tmp_path / "refs"
    assert _prepare(ws["pool"], refs, n=4) == 0
    _lora(ws["base"], refs / "ref_00" / "out", 1, name="ref.safetensors")
    out = tmp_path / "out"
    capsys.readouterr()
    _refused(capsys, lambda: cli.main(_audit(ws, out, refs)), out, "1 of 4 references are trained",
             "ref_01, ref_02, ref_03", "at least 2", "train_references.sh")
    assert not out.exists()
    # another architecture (rank 2 instead of the audited rank 4): the --reference check refuses it
    _lora(ws["base"], refs / "ref_01" / "out", 2, rank=2, name="ref.safetensors")
    _refused(capsys, lambda: cli.main(_audit(ws, out, refs)), out, "does not match the audited LoRA")
    assert not out.exists()
    # not a prepared folder
    _refused(capsys, lambda: cli.main(_audit(ws, out, tmp_path)), out, "references.json", "references prepare")
    assert not out.exists()
