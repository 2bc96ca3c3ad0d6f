"""The start-up summary box both trainer shims print (kohya prints its own summaries the same way)."""

from __future__ import annotations

import textwrap
from typing import Iterable

BOX_WIDTH = 78   # rules this wide do not wrap on an 80-column terminal


def summary_box(lines: Iterable[str], width: int = BOX_WIDTH) -> str:
    """``lines`` wrapped to ``width`` between two rules, each led by ``| `` (continuation lines
    indented). Words are never split, so paths stay whole; there is no right border to break."""
    body = []
    for line in lines:
        body += textwrap.wrap(line, width - 2, subsequent_indent="  ", break_long_words=False,
                              break_on_hyphens=False) or [""]
    rule = "+" + "-" * (width - 1)
    return "\n".join([rule, *(f"| {b}" for b in body), rule])
