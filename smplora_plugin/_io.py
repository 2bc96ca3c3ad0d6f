"""Small helpers the package's writers share: atomic file writes (a temporary file in the target's folder,
then ``os.replace``), and the number formatting and JSON fallback of its reports."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["IMAGE_EXTENSIONS", "atomic_write", "atomic_write_text", "fmt", "json_default", "pct"]

#: image file extensions the package and its shims read (lower case; file names match case-insensitively)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def atomic_write_text(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); the old file stays on any error."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def fmt(x: Optional[float], nd: int = 3) -> str:
    """``x`` with ``nd`` decimals; ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{x:.{nd}f}"


def pct(x: Optional[float]) -> str:
    """The fraction ``x`` as a percentage with one decimal (never ``-0.0%``); ``n/a`` for ``None``."""
    return "n/a" if x is None else f"{round(100 * x, 1) + 0.0:.1f}%"


def json_default(o: Any) -> Any:
    """For ``json.dumps(default=...)``: numpy scalars and arrays and torch tensors as Python values
    (``.tolist()``), anything else (paths, dtypes, ...) as its string."""
    return o.tolist() if hasattr(o, "tolist") else str(o)
