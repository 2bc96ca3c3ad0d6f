"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional


def atomic_write(path: Path, write: Callable[[str], None], *, mode: Optional[int] = None,
                 verify: Optional[Callable[[str], None]] = None) -> Path:
    """Call ``write(tmp)`` then replace ``path`` with ``tmp``; the original is untouched on any error.

    ``mode`` defaults to what a plain ``open()`` would give (0666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        if verify is not None:
            verify(tmp)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
