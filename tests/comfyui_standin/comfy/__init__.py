"""Stand-in of the ``comfy`` package (tests only; see ../README.md)."""
