"""README's audit walk-through, run as written (bash, from a folder that holds the checkout's examples/), at a
smaller size: fewer images, steps, references and attacks. Everything else is the README's text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
SMALLER = [("--digits 32 --holdout 32", "--digits 8 --holdout 8"), ("--max_train_steps 300", "--max_train_steps 2"),
           ("--n 8 ", "--n 2 ")]
AUDIT_SPEED = (" --attacks loss,generation,lira_offline,rmia --draws 1 --no-progress"
               " --config '{\"timesteps\": [100, 300], \"n_boot\": 100}'")


def walkthrough() -> str:
    """The README's bash block that starts with ``make_tiny_pipeline.py``."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith("python examples/diffusers/make_tiny_pipeline.py")]
    assert len(found) == 1, "README.md must hold one walk-through block starting with make_tiny_pipeline.py"
    return found[0]


def test_the_block_says_what_the_issue_asks():
    text = walkthrough()
    for step in ("smplora references prepare", "--layout imagefolder", "bash tiny/refs/train_references.sh",
                 "--references tiny/refs", "--baseline", "examples/diffusers/train_text_to_image_lora.py"):
        assert step in text, step
    for old, _ in SMALLER:
        assert old in text, f"the test shrinks {old!r}: update SMALLER with the README"


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path):
    script = walkthrough()
    for old, new in SMALLER:
        script = script.replace(old, new)
    script = script.rstrip("\n") + AUDIT_SPEED + "\n"
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SMPLORA_DISABLE_PLUGINS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    audit = tmp_path / "tiny" / "audit"
    md = (audit / "report.md").read_text()
    assert md.startswith("# Membership-inference audit") and "**Beyond the base model:" in md
    assert (audit / "exposure.png").stat().st_size > 0 and (audit / "base_model" / "report.md").is_file()
    rep = json.loads((audit / "report.json").read_text())
    assert rep["info"]["references"]["count"] == 2 and {"lira_offline", "rmia"} <= set(rep["attacks"])
    assert "exposure" in rep and rep["verdict"]["beyond_base_model"]["line"]
