"""Aggregate of shard LoRAs (subsample-and-aggregate; cf. DPAgg-TI, Peetathawatchai et al., SaTML 2026): a
frontier lever of issue 23, measured by ``benchmarks/frontier.py`` (rows ``shard avg ...``; the noise by this
module's probe, RESULTS.md section ``shard_noise``) and not moved into the library: the averages leak and
the noise drowns them.

The members are dealt to ``S`` disjoint shards by their content (:func:`hash_shards`: a fixed function of each
image, so adding or removing one member changes one shard only, and exact copies share a shard). One plain
LoRA is trained per shard; the LoRA that ships is the mean of the shards' weight deltas ``B @ A``, each shard's
deltas first clipped to a total Frobenius norm ``clip``, Gaussian noise added once to the mean, and every
module's mean delta refactored to the LoRA's rank by a truncated SVD (:func:`aggregate`, :func:`refactor`).

The premise: the style is common to every shard and survives the mean, while what a shard memorises of its own
members is diluted ``S`` times. With ``clip`` and ``noise`` the release is one Gaussian mechanism: replacing a
member moves one clipped shard delta by at most ``2 * clip``, so the mean moves by at most ``2 * clip / S``, and
noise of standard deviation ``noise * 2 * clip / S`` per entry gives the epsilon of :func:`gaussian_epsilon`
(one release, no sampling; the SVD is post-processing). Without noise it is an empirical defense and carries
no epsilon.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from smplora_plugin.errors import ConfigError, InputError

Deltas = Dict[str, torch.Tensor]
_A, _B = ".lora_A.weight", ".lora_B.weight"


def hash_shards(keys: Sequence[str], shards: int) -> List[int]:
    """Each row's shard, ``int(key, 16) % shards`` for hexadecimal content keys
    (:func:`benchmarks.distill.content_key`): equal images share a shard and a row's shard does not depend on
    the other rows (sizes are then multinomial, not balanced)."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 2:
        raise ConfigError(f"shards must be an integer >= 2, got {shards!r}.")
    try:
        out = [int(k, 16) % shards for k in keys]
    except (TypeError, ValueError) as e:
        raise InputError(f"shard keys must be hexadecimal content hashes (benchmarks.distill.content_key): {e}") from e
    empty = sorted(set(range(shards)) - set(out))
    if empty:
        raise InputError(f"shards {empty} of {shards} hold no image ({len(set(keys))} distinct images); "
                         "use fewer shards or more images.")
    return out


def lora_deltas(state: Mapping[str, torch.Tensor], scale: float = 1.0) -> Deltas:
    """``{module: scale * B @ A}`` from a peft LoRA state dict (linear ``(out, in)`` or 1x1 conv
    ``(out, in, 1, 1)`` weights; the delta keeps the layer's weight shape)."""
    mods = sorted(k[: -len(_A)] for k in state if k.endswith(_A))
    missing = [m for m in mods if m + _B not in state]
    if not mods or missing or len(state) != 2 * len(mods):
        raise InputError(f"not a LoRA state dict of lora_A / lora_B pairs ({len(state)} tensors; unpaired: "
                         f"{missing[:3]}).")
    out: Deltas = {}
    for m in mods:
        a, b = state[m + _A].float(), state[m + _B].float()
        if a.dim() not in (2, 4) or a.shape[2:] != b.shape[2:] or (a.dim() == 4 and a.shape[2:] != (1, 1)):
            raise InputError(f"{m}: only linear and 1x1 conv LoRA weights are supported, got {tuple(a.shape)}.")
        d = scale * (b.flatten(1) @ a.flatten(1))
        out[m] = d.reshape(b.shape[0], a.shape[1], *a.shape[2:])
    return out


def total_norm(deltas: Mapping[str, torch.Tensor]) -> float:
    """The Frobenius norm of all of ``deltas`` together."""
    return float(torch.sqrt(sum((d.float() ** 2).sum() for d in deltas.values())))


def aggregate(shard_deltas: Sequence[Mapping[str, torch.Tensor]], *, clip: Optional[float], noise: float,
              generator: torch.Generator) -> Tuple[Deltas, Dict[str, float]]:
    """The mean of ``shard_deltas`` (each clipped to total norm ``clip`` first; ``None``: no clipping), plus
    Gaussian noise of standard deviation ``noise * 2 * clip / S`` per entry. Returns the mean deltas and facts:
    the shards' median norm before clipping, the share clipped, and the noise's standard deviation."""
    s = len(shard_deltas)
    if s < 2:
        raise ConfigError(f"an aggregate needs at least 2 shards, got {s}.")
    if clip is not None and not clip > 0:
        raise ConfigError(f"clip must be > 0 (or None: no clipping), got {clip!r}.")
    if not noise >= 0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}.")
    if noise > 0 and clip is None:
        raise ConfigError("noise needs a clip: the noise is scaled to the clipped deltas' sensitivity.")
    names = list(shard_deltas[0])
    if any(list(d) != names for d in shard_deltas):
        raise InputError("the shards' deltas cover different modules; train every shard with the same LoRA targets.")
    norms = [total_norm(d) for d in shard_deltas]
    factors = [1.0 if clip is None else min(1.0, clip / max(n, 1e-12)) for n in norms]
    std = noise * 2.0 * clip / s if noise > 0 else 0.0
    mean: Deltas = {}
    for name in names:  # fixed module order: the noise draws do not depend on dict order elsewhere
        m = sum(f * d[name].float() for f, d in zip(factors, shard_deltas)) / s
        if std > 0:
            m = m + std * torch.randn(m.shape, generator=generator)
        mean[name] = m
    facts = {"shard_norm_median": float(torch.tensor(norms).median()),
             "clipped_share": sum(f < 1.0 for f in factors) / s, "noise_std": std}
    return mean, facts


def refactor(delta: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (truncated
    SVD, the singular values split evenly between the factors); shapes as peft's for the delta's layer."""
    flat = delta.float().flatten(1)
    if not 1 <= rank <= min(flat.shape):
        raise ConfigError(f"rank {rank} does not fit a {tuple(flat.shape)} delta.")
    u, sv, vh = torch.linalg.svd(flat, full_matrices=False)
    root = sv[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    tail = delta.shape[2:]
    return a.reshape(rank, delta.shape[1], *tail), b.reshape(delta.shape[0], rank, *tail)


def to_lora_state(deltas: Mapping[str, torch.Tensor], rank: int, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """A peft LoRA state dict (``lora_A`` / ``lora_B`` per module) whose ``scale * B @ A`` is each delta
    refactored to ``rank`` (:func:`refactor`)."""
    if not scale > 0:
        raise ConfigError(f"scale must be > 0, got {scale!r}.")
    out: Dict[str, torch.Tensor] = {}
    for name, d in deltas.items():
        a, b = refactor(d / scale, rank)
        out[name + _A], out[name + _B] = a.contiguous(), b.contiguous()
    return out


def gaussian_epsilon(noise: float, delta: float = 1e-5) -> Optional[float]:
    """Epsilon at ``delta`` of one Gaussian release with noise multiplier ``noise`` (standard deviation over
    sensitivity), by opacus' RDP accountant at sample rate 1 and one step; ``None`` without noise."""
    if noise <= 0:
        return None
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.step(noise_multiplier=float(noise), sample_rate=1.0)
    return float(acc.get_epsilon(delta=delta))


def release_error(shard_deltas: Sequence[Mapping[str, torch.Tensor]], *, clip: float, noise: float, rank: int,
                  generator: torch.Generator) -> float:
    """How far noise moves the released LoRA: ``||R(noised mean) - R(mean)|| / ||R(mean)||`` over all modules,
    ``R`` the refactoring to ``rank`` (:func:`refactor`), both means clipped at ``clip``."""
    clean, _ = aggregate(shard_deltas, clip=clip, noise=0.0, generator=generator)
    noised, _ = aggregate(shard_deltas, clip=clip, noise=noise, generator=generator)

    def low(d):
        a, b = refactor(d, rank)
        return b.flatten(1) @ a.flatten(1)

    num = sum(((low(noised[k]) - low(clean[k])) ** 2).sum() for k in clean)
    den = sum((low(clean[k]) ** 2).sum() for k in clean)
    return float(torch.sqrt(num / den))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Read one frontier's cached shard LoRAs and print, per noise multiplier, the epsilon of one release and
    :func:`release_error` at a clip of the shards' median norm; writes RESULTS.md section ``shard_noise`` with
    ``--write``."""
    import argparse
    import statistics
    import sys

    from . import frontier as fr
    from ._common import write_section

    p = argparse.ArgumentParser(prog="python -m benchmarks.shard_aggregate", description=main.__doc__)
    p.add_argument("--dataset", default="emoji")
    p.add_argument("--members", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--canaries", type=int, default=8)
    p.add_argument("--shards", type=int, nargs="+", default=[8])
    p.add_argument("--runs", default="0,1,2,3", help="comma-separated run indices")
    p.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    rc = fr.Recipe(dataset=a.dataset, members=a.members, steps=a.steps, canaries=a.canaries)
    cache = fr.Cache(fr.default_cache())
    runs = [int(x) for x in a.runs.split(",")]
    lines = ["| shards | run | median shard norm | " + " | ".join(f"sigma {n:g}: error (eps)" for n in a.noise) + " |",
             "|---|---|---|" + "---|" * len(a.noise)]
    for shards in a.shards:
        spec = {"kind": "shard_agg", "shards": shards}
        for run in runs:
            memo = fr.ShardMemo(cache, fr.lora_settings(rc, spec, run))
            states = [memo.get(fr.shard_lora_spec(shards, flip=False, steps=rc.steps), s) for s in range(shards)]
            if any(st is None for st in states):
                raise InputError(f"run {run} of 'shard avg s{shards}' is not cached under {cache.root}; run "
                                 f"`python -m benchmarks.frontier run ... --rows 'shard avg s{shards}'` first.")
            deltas = [lora_deltas(st) for st in states]
            clip = statistics.median(total_norm(d) for d in deltas)
            errs = [release_error(deltas, clip=clip, noise=n, rank=rc.lora_rank,
                                  generator=torch.Generator().manual_seed(run)) for n in a.noise]
            cells = [f"{e:.2f} ({gaussian_epsilon(n):.1f})" for e, n in zip(errs, a.noise)]
            lines.append(f"| {shards} | {run} | {clip:.3f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        cmd = "python -m benchmarks.shard_aggregate " + " ".join(sys.argv[1:] if argv is None else argv)
        body = ("## Shard aggregate: what DP noise does to the released LoRA (issue 23)\n\n"
                f"`{cmd}` (from the frontier's cache). Clip: each run's median shard norm; error: "
                "||R(noised mean) - R(mean)|| / ||R(mean)||, R the refactoring to the LoRA's rank; epsilon of one "
                "Gaussian release at delta 1e-5 (replace-one sensitivity 2 clip / S, no sampling).\n\n" + table + "\n")
        write_section("shard_noise", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
