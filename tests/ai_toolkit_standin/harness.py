"""Test helpers for the ai-toolkit stand-in: a copy of it to install into, image folders, job configs, and an
in-process session (the copy on ``sys.path``, imported once per test process, as ai-toolkit's run.py would)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

STANDIN = Path(__file__).resolve().parent
_SKIP = ("harness.py", "README.md", "__pycache__")


def checkout_copy(dest: Path) -> Path:
    """A fresh copy of the stand-in checkout at ``dest`` (without this helper)."""
    shutil.copytree(STANDIN, dest, ignore=shutil.ignore_patterns(*_SKIP))
    return dest


def write_images(folder: Path, n: int, *, seed: int, size: int = 16, caption: str = "a tiny picture") -> List[Path]:
    """``n`` distinct random RGB PNGs (and ``.txt`` captions) in ``folder``; different seeds give different bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        path = folder / f"img_{seed}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB").save(path)
        path.with_suffix(".txt").write_text(f"{caption} {i}\n")
        out.append(path)
    return out


def job_config(root: Path, *, name: str = "tiny", process_type: str = "sd_trainer_smplora",
               privacy: Optional[Dict[str, Any]] = None, steps: int = 4, save_every: int = 2, batch_size: int = 2,
               train: Optional[Dict[str, Any]] = None, datasets: Optional[List[Dict[str, Any]]] = None,
               **process: Any) -> Dict[str, Any]:
    """An ai-toolkit job config (the YAML's content) over ``root/train`` (and ``root/holdout`` for privacy)."""
    proc: Dict[str, Any] = {
        "type": process_type, "training_folder": str(root / "out"), "device": "cpu", "training_seed": 1,
        "network": {"type": "lora", "linear": 2, "linear_alpha": 2},
        "save": {"save_every": save_every, "max_step_saves_to_keep": 4},
        "datasets": datasets if datasets is not None else [{"folder_path": str(root / "train"), "resolution": 16}],
        "train": {"batch_size": batch_size, "steps": steps, "lr": 1e-2, **(train or {})},
    }
    if privacy is not None:
        proc["privacy"] = privacy
    proc.update(process)
    return {"job": "extension", "config": {"name": name, "process": [proc]}, "meta": {"name": "[name]"}}


def small_privacy(root: Path, **over: Any) -> Dict[str, Any]:
    """A privacy block with a small attacker that updates quickly (paper preset otherwise)."""
    return {"method": "smplora", "holdout_folder": str(root / "holdout"), "feature_grid": 4, "hidden": [16],
            "attacker_lr": 1e-2, "nonmember_every": 1, **over}


class Session:
    """The stand-in installed in a copy and importable in this process (one per test process)."""

    _instance: Optional["Session"] = None

    def __init__(self, root: Path):
        from smplora_plugin.integrations.ai_toolkit import install

        self.checkout = checkout_copy(root / "ai-toolkit")
        install.install(self.checkout)
        sys.path.insert(0, str(self.checkout))

    @classmethod
    def get(cls, root_factory) -> "Session":
        if cls._instance is None:
            cls._instance = cls(Path(root_factory()))
        return cls._instance

    def job(self, config: Dict[str, Any]):
        """Build the job (its processes constructed, as ai-toolkit's ExtensionJob does), not run."""
        from jobs.ExtensionJob import ExtensionJob

        return ExtensionJob(copy.deepcopy(config))

    def run(self, config: Dict[str, Any]):
        """Build and run the job; returns its first process."""
        job = self.job(config)
        job.run()
        return job.process[0]


def header(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def dumps(config: Dict[str, Any]) -> str:
    return json.dumps(config, indent=2)
