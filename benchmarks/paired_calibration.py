"""Calibration of the paired verdict (:func:`smplora_plugin.audit.compare_to_baseline`) on simulated pairs.

Each draw: ``n`` members and ``n`` non-members, ``k`` attacks whose scores share a per-sample
difficulty; the baseline's members are shifted by ``base_shift`` standard deviations, and the LoRA's
scores are ``rho * baseline + noise`` plus ``row_shift`` on the members. Prints the share of draws
read "leaks beyond the baseline" with label permutations and with the normal approximation.

  python -m benchmarks.paired_calibration --draws 400
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Tuple

import numpy as np

from smplora_plugin.audit.paired import BEYOND, compare_to_baseline
from smplora_plugin.audit.verdict import AttackScores

CASES = {  # name: (rho, base_shift, row_shift)
    "neither leaks": (0.8, 0.0, 0.0),
    "LoRA leaks as much as a leaky baseline": (0.9, 0.4, 0.04),  # 0.9 * 0.4 + 0.04 = 0.4
    "LoRA adds a member shift of 0.2": (0.8, 0.0, 0.2),
}


def _report(scores: np.ndarray, labels: np.ndarray) -> SimpleNamespace:
    cal = np.array([1, 1, 0, 0])
    return SimpleNamespace(scores={f"a{i}": AttackScores(s, s[:4], cal) for i, s in enumerate(scores)},
                           eval_labels=labels, verdict=None)


def simulated_pair(rng: np.random.Generator, n: int, rho: float, base_shift: float, row_shift: float,
                   k: int = 3) -> Tuple[SimpleNamespace, SimpleNamespace]:
    """``(LoRA report, baseline report)`` with the scores of ``k`` attacks on the same ``2n`` samples."""
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    common = rng.standard_normal(2 * n)
    base = np.stack([0.7 * common + 0.7 * rng.standard_normal(2 * n) for _ in range(k)]) + base_shift * y
    row = rho * base + np.sqrt(1 - rho ** 2) * rng.standard_normal(base.shape) + row_shift * y
    return _report(row, y), _report(base, y)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--members", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"| case ({args.members} members + {args.members} non-members, 3 attacks, {args.draws} draws) | "
          "'beyond' with permutations | with the normal approximation |\n|---|---|---|")
    for name, (rho, bs, rs) in CASES.items():
        rates = []
        for n_perm in (1000, 0):
            hits = [compare_to_baseline(*simulated_pair(rng, args.members, rho, bs, rs), seed=r, n_permutations=n_perm,
                                        n_sim=5000)["verdict"] == BEYOND for r in range(args.draws)]
            rates.append(f"{100 * np.mean(hits):.1f}%")
        print(f"| {name} | {rates[0]} | {rates[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
