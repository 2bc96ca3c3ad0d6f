"""Stand-in of ComfyUI's folder_paths over a temporary base folder (``set_base``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Tuple

_BASE = Path(os.environ.get("COMFY_STANDIN_BASE", "/nonexistent-standin"))


def set_base(path) -> None:
    global _BASE
    _BASE = Path(path)
    for sub in ("models/loras", "output", "input", "temp"):
        (_BASE / sub).mkdir(parents=True, exist_ok=True)


def get_output_directory() -> str:
    return str(_BASE / "output")


def get_temp_directory() -> str:
    return str(_BASE / "temp")


def get_folder_paths(folder_name: str) -> List[str]:
    return [str(_BASE / "models" / folder_name)]


def get_filename_list(folder_name: str) -> List[str]:
    root = Path(get_folder_paths(folder_name)[0])
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = Path(get_folder_paths(folder_name)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return str(path)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0,
                        image_height=0) -> Tuple[str, str, int, str, str]:
    subfolder, filename = os.path.split(os.path.normpath(filename_prefix))
    full = os.path.join(output_dir, subfolder)
    os.makedirs(full, exist_ok=True)
    pattern = re.compile(re.escape(filename) + r"_(?:\d+_steps_)?(\d{5})_")
    counters = [int(m.group(1)) for f in os.listdir(full) if (m := pattern.match(f))]
    return full, filename, max(counters, default=0) + 1, subfolder, filename_prefix
