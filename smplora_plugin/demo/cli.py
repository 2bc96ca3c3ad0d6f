"""``smplora demo``: arguments and entry point (dispatched from :mod:`smplora_plugin.cli`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    from .pipeline import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", default="smplora_demo", help="output folder for reports, LoRA files and samples "
                                                              "(default: ./smplora_demo)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced size for CI (16 members, 200 steps, 64 evaluation non-members, "
                             "fewer audit draws)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the private splits, LoRA and audit")
    from .datasets import NAMES

    parser.add_argument("--dataset", choices=NAMES, default=d.dataset,
                        help="digits (default): scikit-learn's 8x8 digits; textures: 16x16 procedurally generated "
                             "textured shapes with per-instance detail (harder to protect; about twice as slow); "
                             "emoji: 16x16 RGB emoji, a base drawing them in Noto's style and a LoRA learning "
                             "Twemoji's (a style LoRA; utility is the share of samples in the LoRA's style)")
    parser.add_argument("--members", type=int, default=None, help=f"number of members (default {d.members})")
    parser.add_argument("--steps", type=int, default=None, help=f"LoRA steps (default {d.steps})")
    parser.add_argument("--rank", type=int, default=None, help=f"LoRA rank (default {d.lora_rank})")
    parser.add_argument("--lr", type=float, default=None, help=f"LoRA learning rate (default {d.lora_lr})")
    parser.add_argument("--alpha", type=float, default=None, help=f"SMP-LoRA alpha (default {d.smp_alpha})")
    parser.add_argument("--attacker-lr", type=float, default=None,
                        help=f"learning rate of SMP-LoRA's proxy attacker (default {d.attacker_lr})")
    parser.add_argument("--mp", action="store_true", help="also train and audit MP-LoRA (the unstable baseline)")
    parser.add_argument("--k-steps", type=int, default=None,
                        help=f"proxy attacker updates per LoRA step (default {d.k_steps})")
    parser.add_argument("--mp-alpha", type=float, default=None, help=f"MP-LoRA alpha (default {d.mp_alpha})")
    parser.add_argument("--references", type=int, default=0, metavar="N",
                        help="also train N plain reference LoRAs (N >= 2; 8-16 useful) on random halves of the audited "
                             "images and add LiRA (online, offline) and RMIA to the audit; the audit's calibration and "
                             "evaluation non-member sets are then each half the member count, so the pool is twice "
                             "the members and a reference trains on as many images as the target")
    parser.add_argument("--retrain-base", action="store_true",
                        help="train the base model and classifier here instead of loading the shipped weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per job (default 1: the tiny model's ops are too small to gain from "
                             "more, and extra threads slow down badly on a shared machine)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="columns (LoRA variants and the base model) trained and audited at once, each in its own "
                             "process (default: one per free core, at most one per column; 1: one after another in "
                             "this process, with progress bars); the figures are the same for any value")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    from .pipeline import DemoConfig

    kw: Dict[str, Any] = {"seed": args.seed, "dataset": getattr(args, "dataset", "digits")}
    for name, field in (("members", "members"), ("steps", "steps"), ("rank", "lora_rank"), ("lr", "lora_lr"),
                        ("alpha", "smp_alpha"), ("attacker_lr", "attacker_lr"), ("mp_alpha", "mp_alpha"),
                        ("k_steps", "k_steps")):
        v = getattr(args, name, None)
        if v is not None:
            kw[field] = v
    refs = getattr(args, "references", 0)
    if refs:
        n_mem = kw.get("members", DemoConfig.quick().members if args.quick else DemoConfig().members)
        kw.update(references=refs, nonmember_calibration=n_mem // 2, nonmember_eval=n_mem - n_mem // 2)
    if args.mp:
        kw["variants"] = ("plain", "smp", "smp-robust", "mp")
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the side-by-side table. Returns the exit status."""
    import torch

    from .columns import columns_of, default_jobs
    from .pipeline import ASSETS, render_table, run_demo

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"smplora demo: error: {exc}", file=sys.stderr)
        return 2
    if args.threads < 1 or (args.jobs is not None and args.jobs < 1):
        print("smplora demo: error: --threads and --jobs must be >= 1.", file=sys.stderr)
        return 2
    jobs = args.jobs or default_jobs(len(columns_of(cfg)), args.threads)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    summary = run_demo(cfg, args.out, progress=not args.no_progress, assets=None if args.retrain_base else ASSETS,
                       log=lambda m: print(m, file=sys.stderr, flush=True), jobs=jobs)
    print(render_table(summary))
    print(f"\nReports written to {args.out}/ (summary.md, summary.json, manifest.json; <variant>/report.md|json, "
          f"roc.png, per_timestep_auc.png, manifest.json, samples.png, lora.safetensors; base/: the base model's "
          f"audit). Wall time {time.time() - t0:.0f} s ({summary['jobs']} job{'s' if summary['jobs'] > 1 else ''}).")
    return 0
