"""The project's hand-run benchmarks; run each from the repository root as ``python -m benchmarks.NAME``
(see benchmarks/RESULTS.md). Shared helpers: :mod:`benchmarks._common`; step stamping of whole trainers:
:mod:`benchmarks._stamps`."""
