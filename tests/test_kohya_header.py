"""kohya's header and output folder with --privacy, as a newcomer meets them (against the stand-in).

- the LoRA header equals the one of the same command without --privacy, apart from smplora.* and
  per-run values (session id, start time, the hash of the differently trained weights);
- nothing is written before every check has passed, and written files get the user's usual mode;
- the launcher's help and the start-up summary read right.
The same header diff against a real sd-scripts checkout is in test_kohya_real.py (SD_SCRIPTS_DIR).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile

import pytest
from safetensors import safe_open
from test_kohya_standin import _clean_kohya_modules, data, header, kohya_args, launch, standin  # noqa: F401

PER_RUN = {"ss_session_id", "ss_training_started_at", "sshs_model_hash"}
PRIV = ["--privacy_feature_grid", "4", "--privacy_attacker_hidden", "8"]


def _kohya_keys(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("smplora.") and k not in PER_RUN}


def _check_hash(path) -> None:
    """The stand-in's sshs_model_hash covers the ss_* keys as written: it was computed after the restore."""
    tn = standin()
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    assert meta["sshs_model_hash"] == tn.ss_hash(tensors, meta)


@pytest.mark.parametrize("layout", ["train_data_dir", "dataset_config"])
def test_header_with_privacy_equals_header_without(data, tmp_path, layout, caplog):  # noqa: F811
    if layout == "dataset_config":
        cfg = {"datasets": [{"subsets": [{"image_dir": str(data / "train" / "2_thing"), "num_repeats": 2},
                                         {"image_dir": str(data / "reg" / "1_class"), "is_reg": True}]}]}
        (tmp_path / "ds.json").write_text(json.dumps(cfg))
        common = ["--dataset_config", str(tmp_path / "ds.json")]
    else:
        common = ["--reg_data_dir", str(data / "reg")]
    common += ["--max_train_steps", "3", "--save_every_n_steps", "2", "--flip_aug", "--keep_tokens", "1"]
    assert launch("train_network.py", *kohya_args(data, tmp_path / "plain", *common)) == 0
    caplog.set_level(logging.INFO)
    assert launch("train_network.py", *kohya_args(data, tmp_path / "priv", *common), "--privacy", "smplora",
                  "--privacy_holdout_dir", str(data / "holdout"), *PRIV) == 0
    for name in ("lora-step00000002.safetensors", "lora.safetensors"):
        plain, priv = header(tmp_path / "plain" / name), header(tmp_path / "priv" / name)
        assert _kohya_keys(priv) == _kohya_keys(plain)
        assert {"smplora.config", "smplora.data", "smplora.metrics"} <= set(priv)
        _check_hash(tmp_path / "priv" / name)
    assert plain["ss_num_validation_images"] == "0"
    assert "holdout" not in plain["ss_tag_frequency"]
    if layout == "train_data_dir":   # kohya's per-dataset keys, not the dataset-config ones
        assert "ss_datasets" not in priv and priv["ss_flip_aug"] == "True" and priv["ss_keep_tokens"] == "1"
        assert json.loads(priv["ss_reg_dataset_dirs"]) == {"1_class": {"n_repeats": 1, "img_count": 2}}
    else:
        assert len(json.loads(priv["ss_datasets"])) == 1
    # the held-out images were still used, and kohya's own lines about the empty training side are explained
    assert json.loads(priv["smplora.data"])["counts"]["nonmember"] == 4
    log = caplog.text
    assert "no images found" in log and "empty training side" in log
    kept = json.loads((tmp_path / "priv" / "lora_smplora_dataset.json").read_text())
    assert kept["datasets"][-1]["validation_split"] == 1.0


def test_refused_run_writes_nothing(data, tmp_path, capsys):  # noqa: F811
    shutil.copy(data / "train" / "2_thing" / "img_00.png", data / "holdout" / "1_thing" / "copy.png")
    before = set(os.listdir(tempfile.gettempdir()))
    out = tmp_path / "out"
    rc = launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), "--privacy", "smplora",
                "--privacy_holdout_dir", str(data / "holdout"), *PRIV)
    assert rc == 2 and "byte-identical" in capsys.readouterr().err
    assert not out.exists()                                  # no folder, no dataset config, no manifest
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("smplora_kohya_")}
    assert not left                                          # the temporary dataset config is gone too


def test_written_files_get_the_usual_mode(data, tmp_path):  # noqa: F811
    old = os.umask(0o027)
    try:
        out = tmp_path / "out"
        assert launch("train_network.py", *kohya_args(data, out, "--max_train_steps", "2"), "--privacy", "smplora",
                      "--privacy_holdout_dir", str(data / "holdout"), *PRIV) == 0
    finally:
        os.umask(old)
    for name in ("lora_smplora_dataset.json", "lora_smplora_manifest.json", "lora.smplora_state"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name


def test_help_does_not_warn_about_training_without_the_defense(capsys):
    with pytest.raises(SystemExit) as exc:
        launch("train_network.py", "--help")
    assert exc.value.code == 0
    cap = capsys.readouterr()
    assert "--privacy_holdout_dir" in cap.out and "WITHOUT" not in cap.out + cap.err
    assert launch("--help") == 0 and "WITHOUT" not in capsys.readouterr().out


def test_summary_box_fits_80_columns():
    from smplora_plugin.integrations.summary import summary_box

    text = summary_box(["a" * 20 + " word" * 40, "manifest: /a/very/long/path/" + "x" * 90 + ".json", "short"])
    lines = text.splitlines()
    assert lines[0] == lines[-1] and lines[0].startswith("+-")
    assert all(len(line) <= 78 for line in lines if "xxxx" not in line)
    assert any(("x" * 90) in line for line in lines)          # a path is never split
    assert all(line.startswith("| ") for line in lines[1:-1])
