"""`PoissonBatchSampler`: the batches the DP accountant assumes."""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from .errors import DPError


class PoissonBatchSampler(Sampler[List[int]]):
    """Batches of indices in which every sample of ``range(dataset_size)`` appears independently with
    probability ``sample_rate``: variable sizes, possibly empty (step with them anyway: noise only).

    Each batch costs exactly one ``torch.rand(dataset_size, generator=generator)``, so restoring the
    generator's state resumes the sequence. Use it as ``DataLoader(ds, batch_sampler=...)`` (with a
    ``collate_fn`` that accepts an empty list) or index tensors directly in a raw loop.

    Args:
        dataset_size: ``N``.
        sample_rate: ``q`` (the ``DPGradients.sample_rate``).
        steps: batches per iteration; default ``round(1 / q)`` (one epoch in expectation).
        generator: a :class:`torch.Generator` (default: a non-deterministically seeded one).
    """

    def __init__(self, dataset_size: int, sample_rate: float, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None):
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise DPError(f"dataset_size={dataset_size!r} must be a positive int.")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise DPError(f"sample_rate={sample_rate!r} must be in (0, 1] (q = expected batch size / dataset size).")
        if steps is None:
            steps = max(1, round(1.0 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise DPError(f"steps={steps!r} must be a non-negative int (batches per iteration).")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DPError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        self.dataset_size, self.sample_rate = dataset_size, float(sample_rate)
        self.steps, self.generator = steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            draws = torch.rand(self.dataset_size, generator=self.generator, device=self.generator.device)
            mask = draws < self.sample_rate
            yield mask.nonzero().flatten().tolist()
