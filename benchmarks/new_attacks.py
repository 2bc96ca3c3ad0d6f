"""Quantile regression, GSA and the generation attack next to the loss attacks on the demo (digits).

Trains plain LoRA and the `robust` preset (smp-robust) exactly as `smplora demo` does, audits each
with the loss attacks and the three new attacks, and writes one JSON row per (seed, variant) with
AUC [95% CI], TPR@1%FPR and seconds per attack (and per audited sample).

    nice -n 10 python benchmarks/new_attacks.py --seeds 0 1 2 --out benchmarks/new_attacks_rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ATTACKS = ("loss", "loss_calibrated", "quantile", "gsa", "generation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="benchmarks/new_attacks_rows.jsonl")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from smplora_plugin.demo.pipeline import DemoConfig, run_demo

    out = Path(a.out)
    for seed in a.seeds:
        cfg = DemoConfig(seed=seed, variants=("plain", "smp-robust"), attacks=ATTACKS)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_demo(cfg, tmp, progress=False, log=lambda *_: None)
            for variant in cfg.variants:
                rep = json.loads((Path(tmp) / variant / "report.json").read_text())
                n = sum(rep["splits"].values())
                row = {"seed": seed, "variant": variant, "samples": n, "splits": rep["splits"],
                       "steps": cfg.steps, "members": cfg.members,
                       "attacks": {k: {"auc": r["auc"], "auc_ci95": r["auc_ci95"],
                                       "tpr_at_1pct_fpr": r["tpr_at_1pct_fpr"], "seconds": r["seconds"],
                                       "ms_per_sample": round(1000 * r["seconds"] / n, 2),
                                       "chosen": r["calibration"]}
                                   for k, r in rep["attacks"].items()}}
                with out.open("a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(seed, variant, {k: round(v["auc"], 3) for k, v in row["attacks"].items()}, flush=True)
        print(f"seed {seed}: {time.time() - t0:.0f} s, timings {summary.get('timings')}", flush=True)


if __name__ == "__main__":
    main()
