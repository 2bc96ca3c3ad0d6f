"""The error of the DP mechanism."""

from __future__ import annotations

from ..errors import SmploraError


class DPError(SmploraError):
    """A differential-privacy option, input or state that the mechanism cannot honour (names the fix)."""
