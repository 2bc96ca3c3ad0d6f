"""Quantile regression, GSA and the generation attack next to the loss attacks on the demo (digits).

Trains plain LoRA and the `robust` preset (smp-robust) exactly as `smplora demo` does, audits each
with the loss attacks and the three new attacks, and writes one JSON row per (seed, variant) with
AUC [95% CI], TPR@1%FPR and seconds per attack (and per audited sample).

    nice -n 10 python -m benchmarks.new_attacks --seeds 0 1 2 --out benchmarks/new_attacks_rows.jsonl
    nice -n 10 python -m benchmarks.new_attacks --untouched --seeds 0 1 2 --out benchmarks/new_attacks_rows.jsonl
    python -m benchmarks.new_attacks --table benchmarks/new_attacks_rows.jsonl   # the Markdown table
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
    p.add_argument("--untouched", action="store_true",
                   help="audit the shipped base model with a zero LoRA (it saw nothing) on the demo's splits instead")
    a = p.parse_args()
    if a.table:
        print(table([json.loads(line) for line in Path(a.table).read_text().splitlines() if line.strip()]))
        return
    torch.set_num_threads(a.threads)
    from smplora_plugin.demo.pipeline import DemoConfig, run_demo

    out = Path(a.out)
    if a.untouched:
        for seed in a.seeds:
            row = untouched_row(DemoConfig(seed=seed))
            with out.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(seed, "untouched", {k: round(v["auc"], 3) for k, v in row["attacks"].items()}, flush=True)
        return
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


def untouched_row(cfg) -> dict:
    """Audit the base model carrying a zero LoRA (``lora_B`` = 0 after init: it saw nothing), demo splits."""
    from smplora_plugin.audit import run_audit
    from smplora_plugin.demo.pipeline import _member_halves, _samples, load_assets
    from smplora_plugin.demo.target import TinyLDMTarget

    ds = cfg.data
    splits = ds.splits({"member": cfg.members, "nonmember_defense": cfg.nonmember_defense,
                        "nonmember_calibration": cfg.nonmember_calibration, "nonmember_eval": cfg.nonmember_eval},
                       cfg.seed)
    loaded = load_assets(cfg)
    if loaded is None:
        raise SystemExit("the shipped demo base model does not match this config; run `smplora demo` once first.")
    model = loaded[0]
    model.add_lora(cfg.lora_rank, seed=cfg.seed)  # peft's gaussian init: lora_B = 0, so the model is the base
    m_cal, m_eval = _member_halves(splits["member"], cfg.seed)
    rep = run_audit(TinyLDMTarget(model), _samples(m_eval), _samples(splits["nonmember_eval"]),
                    calibration_members=_samples(m_cal),
                    calibration_nonmembers=_samples(splits["nonmember_calibration"]),
                    attacks=list(ATTACKS), config={"seed": cfg.seed}, progress=False,
                    num_threads=torch.get_num_threads())
    d = rep.to_dict()
    n = sum(d["splits"].values())
    return {"seed": cfg.seed, "variant": "untouched", "samples": n, "splits": d["splits"], "steps": 0,
            "members": cfg.members,
            "attacks": {k: {"auc": r["auc"], "auc_ci95": r["auc_ci95"], "tpr_at_1pct_fpr": r["tpr_at_1pct_fpr"],
                            "seconds": r["seconds"], "ms_per_sample": round(1000 * r["seconds"] / n, 2),
                            "chosen": r["calibration"]} for k, r in d["attacks"].items()}}


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
