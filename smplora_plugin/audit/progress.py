"""What the audit shows on stderr: tqdm progress bars (when tqdm is installed and enabled; a silent
stand-in otherwise) and warnings (:func:`warn`, always shown)."""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A bar with ``update(n)`` / ``close()``; silent when disabled or tqdm is missing."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the audit extra; progress is optional
        return _Silent()
    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def warn(message: str) -> None:
    """Print ``message`` as an audit warning on stderr (it is also recorded in the report)."""
    print(f"smplora audit: WARNING: {message}", file=sys.stderr)
