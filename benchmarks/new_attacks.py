"""Quantile regression, GSA and the generation attack next to the loss attacks on the demo (digits).

Trains plain LoRA and the `robust` preset (smp-robust) exactly as `smplora demo` does, audits each
with the loss attacks and the three new attacks, and writes one JSON row per (seed, variant) with
AUC [95% CI], TPR@1%FPR and seconds per attack (and per audited sample).

    nice -n 10 python benchmarks/new_attacks.py --seeds 0 1 2 --out benchmarks/new_attacks_rows.jsonl
    python benchmarks/new_attacks.py --table benchmarks/new_attacks_rows.jsonl   # the Markdown table
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
    p.add_argument("--table", default=None, help="print the Markdown table of a rows file and exit")
    a = p.parse_args()
    if a.table:
        print(table([json.loads(line) for line in Path(a.table).read_text().splitlines() if line.strip()]))
        return
    torch.set_num_threads(a.threads)
    from smplora_plugin.demo.pipeline import DemoConfig, run_demo

    out = Path(a.out)
    for seed in a.seeds:
        cfg = DemoConfig(seed=seed, variants=("plain", "smp-robust"), attacks=ATTACKS)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            run_demo(cfg, tmp, progress=False, log=lambda *_: None)
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
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)


def table(rows: list) -> str:
    """Per attack and variant: AUC [95% CI] and TPR@1%FPR per seed, and the mean ms per audited sample."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    head = "| attack | " + " | ".join(f"{v}: AUC [95% CI] / TPR@1%FPR (seeds {', '.join(map(str, seeds))})"
                                        for v in variants) + " | ms / sample |"
    lines = [head, "|" + "---|" * (len(variants) + 2)]
    for att in ATTACKS:
        cells, ms = [], []
        for v in variants:
            parts = []
            for r in sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"]):
                x = r["attacks"][att]
                tpr = "n/a" if x["tpr_at_1pct_fpr"] is None else f"{100 * x['tpr_at_1pct_fpr']:.1f}%"
                parts.append(f"{x['auc']:.3f} [{x['auc_ci95'][0]:.2f}, {x['auc_ci95'][1]:.2f}] / {tpr}")
                ms.append(x["ms_per_sample"])
            cells.append("<br>".join(parts))
        lines.append(f"| {att} | " + " | ".join(cells) + f" | {sum(ms) / len(ms):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
