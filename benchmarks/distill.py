"""Disjoint-shard distillation (DistillMD, Tran et al., arXiv 2410.16657): a frontier lever of issue 23,
measured by ``benchmarks/frontier.py`` (rows ``distill ...``) and not moved into the library: its students
leak (benchmarks/RESULTS.md, section ``frontier_candidates``).

The members are split into ``S`` disjoint shards, one plain teacher LoRA is trained per shard, and the
LoRA that ships (the student) is trained on every member with the teachers' noise predictions as its
target in place of the true noise: a member's target is the mean prediction of the teachers that never
saw it. The premise: a member's own noise draws never reach the student, so the loss an attacker measures
on it would be a non-member's loss under those teachers. Measured, it does not hold: a teacher's predictions
at other images' noisy inputs carry its own members, and the student learns them (section
``distill_timesteps``). Exact copies must share a shard (:func:`assign_shards` groups
rows by content), otherwise a copy in another shard trains the teacher of the first.

This is an empirical defense: it carries no epsilon.
"""

from __future__ import annotations

from typing import Callable, Hashable, List, Sequence

import torch

from smplora_plugin.errors import ConfigError, InputError
from smplora_plugin.holdout import content_hash

Teacher = Callable[..., torch.Tensor]


def content_key(image: torch.Tensor) -> str:
    """:func:`smplora_plugin.holdout.content_hash` of an image's dtype, shape and values: equal images get equal
    keys."""
    t = image.detach().cpu().contiguous()
    values = (t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes()  # numpy has no bfloat16
    return content_hash(f"{t.dtype}{tuple(t.shape)}".encode() + values)


def assign_shards(keys: Sequence[Hashable], shards: int, seed: int) -> List[int]:
    """Each row's shard: rows with equal keys share one, the distinct keys are dealt to ``shards`` shards in a
    seeded random order (sizes differ by at most one key)."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 2:
        raise ConfigError(f"shards must be an integer >= 2, got {shards!r}: one shard leaves no teacher that "
                          "did not see a member.")
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < shards:
        raise InputError(f"{len(distinct)} distinct images cannot fill {shards} shards; use shards <= "
                         f"{max(2, len(distinct))} or add images.")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    shard_of = {distinct[j]: rank % shards for rank, j in enumerate(order)}
    return [shard_of[k] for k in keys]


class ShardTargets:
    """The student's targets: for rows ``idx`` (indices into the members), the mean over the teachers that did
    not see each row of ``teacher(*inputs)``, computed without gradients.

    ``teachers[s]`` was trained on the rows whose ``shard_of`` is ``s``; ``inputs`` are batched along their
    first dimension (noisy latents, timesteps, conditioning) and sliced per teacher.
    """

    def __init__(self, teachers: Sequence[Teacher], shard_of: Sequence[int]):
        if len(teachers) < 2:
            raise ConfigError(f"shard distillation needs at least 2 teachers, got {len(teachers)}.")
        bad = sorted({s for s in shard_of if not 0 <= int(s) < len(teachers)})
        if bad:
            raise InputError(f"shard ids {bad} have no teacher ({len(teachers)} teachers: ids 0..{len(teachers) - 1}).")
        self.teachers = list(teachers)
        self.shard_of = torch.as_tensor([int(s) for s in shard_of], dtype=torch.long)

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        rows = self.shard_of[idx.cpu()]
        out = None
        for s, teacher in enumerate(self.teachers):
            pick = (rows != s).nonzero().flatten()
            if len(pick) == 0:
                continue
            dev = pick.to(inputs[0].device)
            pred = teacher(*(x[dev] for x in inputs)).float()
            if out is None:
                out = torch.zeros((len(idx), *pred.shape[1:]), dtype=pred.dtype, device=pred.device)
            out.index_add_(0, dev, pred)
        assert out is not None  # every row has S - 1 >= 1 teachers
        return out / (len(self.teachers) - 1)
