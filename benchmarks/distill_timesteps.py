"""Where a frontier row's membership signal lives, timestep by timestep (issue 23's distillation rows).

For run ``r`` of each row (its LoRA read from the frontier cache; a missing one is an error, never
trained here), every audited member and non-member (the run's ``2M`` pool images, canaries left out) is
noised at each timestep of ``--timesteps`` with ``--draws`` seeded noise draws, the same draws for every
row. A sample's score is its loss under the untouched model less its loss under the row's LoRA, on the
same draws (the calibrated loss: a raw loss mostly measures how hard an image is); the table gives, per
timestep, the AUC of that score (members gain more: above 0.5) and its mean gap (members less
non-members).

  python -m benchmarks.distill_timesteps --runs 0,1 --rows "untouched,plain,distill s2,distill holdout" --write
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List, Sequence, Tuple

import torch

from smplora_plugin.audit.metrics import auc

from . import frontier as fr
from ._common import header, write_section


@torch.no_grad()
def per_sample_losses(model, images: torch.Tensor, captions: Sequence[str], timesteps: Sequence[int], draws: int,
                      seed: int) -> torch.Tensor:
    """``(len(timesteps), N)`` mean squared noise-prediction errors, averaged over ``draws`` seeded draws."""
    g = torch.Generator().manual_seed(seed)
    z0, cond = model.encode(images), model.text(list(captions))
    out = torch.zeros(len(timesteps), len(images))
    for i, t in enumerate(timesteps):
        for _ in range(draws):
            noise = torch.randn(z0.shape, generator=g)
            tt = torch.full((len(images),), int(t), dtype=torch.long)
            pred = model.predict(model.add_noise(z0, tt, noise), tt, cond)
            out[i] += ((pred - noise) ** 2).mean((1, 2, 3)) / draws
    return out


Table = Dict[str, Dict[int, List[float]]]


def measure(rc: fr.Recipe, rows: Sequence[str], runs: Sequence[int], timesteps: Sequence[int],
            draws: int) -> Tuple[Table, Table]:
    """``{row: {t: [AUC per run]}}`` and ``{row: {t: [gap per run]}}`` as ``(aucs, gaps)``; the first row must be
    ``untouched`` (the calibration) and is not in them."""
    if rows[0] != "untouched":
        raise SystemExit("the first row must be 'untouched': the other rows' losses are calibrated against it.")
    cache = fr.Cache(fr.default_cache())
    setup = fr._setup(rc.dataset)
    pool, _ = fr.audited_pool(rc.dataset, rc.members)
    aucs: Table = {r: {t: [] for t in timesteps} for r in rows[1:]}
    gaps: Table = {r: {t: [] for t in timesteps} for r in rows[1:]}
    for run in runs:
        draw = fr.run_draw(len(pool), rc.members, run)
        members = draw["member"]
        nonmembers = sorted(draw["nonmember_cal"] + draw["nonmember_eval"])
        for row in rows:
            spec = fr.row_spec(row)
            if not cache.done("lora", fr.settings_key(fr.lora_settings(rc, spec, run))):
                raise SystemExit(f"row {row!r} run {run} is not in the frontier cache {cache.root}; run "
                                 "`python -m benchmarks.frontier run ...` with this recipe first.")
            model, _ = fr.ensure_lora(cache, rc, spec, run, setup=setup)
            loss = per_sample_losses(model, pool.images, pool.captions, timesteps, draws, seed=77_001 + run)
            if row == "untouched":
                base = loss
                continue
            gain = base - loss
            for i, t in enumerate(timesteps):
                m, n = gain[i, members].tolist(), gain[i, nonmembers].tolist()
                aucs[row][t].append(auc(m, n))
                gaps[row][t].append(statistics.fmean(m) - statistics.fmean(n))
    return aucs, gaps


def table(aucs, gaps, timesteps: Sequence[int], runs: Sequence[int]) -> str:
    head = "| row | " + " | ".join(f"t={t}" for t in timesteps) + " |"
    lines = [head, "|" + "---|" * (len(timesteps) + 1)]
    for row in aucs:
        cells = [f"{statistics.fmean(aucs[row][t]):.3f} ({statistics.fmean(gaps[row][t]) * 1e3:+.2f})"
                 for t in timesteps]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return (f"Runs {', '.join(map(str, runs))} (mean over runs); cell: AUC of the calibrated loss (the untouched "
            "model's loss less the row's, same draws), members vs non-members of the audited pool (no canaries), "
            "and in brackets its mean gap, members less non-members, x 1e3.\n\n" + "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="emoji")
    p.add_argument("--members", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--canaries", type=int, default=8, help="the recipe's canaries (they select its cached LoRAs)")
    p.add_argument("--runs", default="0,1")
    p.add_argument("--rows", default="untouched,plain,distill s2,distill holdout")
    p.add_argument("--timesteps", default="20,100,250,500,750,950")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--write", action="store_true", help="write RESULTS.md's distill_timesteps section")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rc = fr.Recipe(dataset=args.dataset, members=args.members, steps=args.steps, canaries=args.canaries)
    rc.validate()
    runs = [int(x) for x in args.runs.split(",")]
    timesteps = [int(x) for x in args.timesteps.split(",")]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    aucs, gaps = measure(rc, rows, runs, timesteps, args.draws)
    body = table(aucs, gaps, timesteps, runs)
    print(body)
    if args.write:
        write_section("distill_timesteps", "## Where the distilled students leak, by timestep (issue 23)\n\n"
                      + header() + f"- recipe: {args.dataset}, {args.members} members, {args.steps} steps, "
                      f"{args.canaries} canaries per run, {args.draws} noise draws per (image, t)\n\n" + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
