"""Per-step cost of SMP-LoRA in real kohya sd-scripts (a hand-run: needs a checkout and its venv).

Runs ``train_network.py`` as a user would: plain (the script itself) and through the launcher
(``python -m smplora_plugin.integrations.kohya``) with ``--privacy smplora`` (``paper``, the
defaults) and ``--privacy_preset robust``, in interleaved rounds (the order rotates each round, so a
drift of the machine hits every variant alike). Each run is a child process that time-stamps every
step of kohya's ``AdamW`` (``_stamps.py``; the attacker's ``Adam`` is not counted): the mean step
of a run drops the first ``--skip`` gaps and the rest should span whole cycles of the privacy
schedule (at batch 2 ``robust`` has a privacy row every other step and a held-out forward every
fourth of those: 8 steps; ``paper`` a held-out forward every 4 steps). Per variant the median over
rounds, and per round the ratio to that round's plain run. The whole process is timed too (wall,
CPU, peak RSS, start to first step, last step to exit). kohya's epoch validation over the held-out
images is off in the privacy runs (the launcher's default); with it on, its pass at an epoch's end
would land in the gap between two stamps.

The fixture is ``scripts/kohya/make_tiny_sd15.py``'s (SD1.5 UNet block widths, random weights;
its images are 64 px, so 8x8 latents).

Run (on a quiet machine; pin it to one core with ``taskset -c 0`` if others work on the other)::

    python scripts/kohya/make_tiny_sd15.py FIXTURE          # once, in the kohya venv
    python -m benchmarks.kohya_overhead --sd-scripts SD_SCRIPTS --fixture FIXTURE \\
        --python KOHYA_VENV/bin/python --steps 18 --skip 1 --rounds 3 --write

``--python`` must have sd-scripts' requirements and smplora-plugin installed (``pip install --no-deps -e .``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from ._common import header, write_section
from ._stamps import StampedRun, offline_env, run_stamped

VARIANTS = {
    "plain": [],
    "paper (defaults)": ["--privacy", "smplora"],
    "robust": ["--privacy", "smplora", "--privacy_preset", "robust"],
    "dpsgd": ["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0"],  # DP-SGD alone (needs opacus in --python)
}


def kohya_args(fx: Path, out: Path, steps: int, batch: int, resolution: int) -> list:
    """The command line of ``tests/test_kohya_real.py`` (fp32, one data-loader process)."""
    return ["--pretrained_model_name_or_path", str(fx / "model"), "--tokenizer_cache_dir", str(fx / "tokenizers"),
            "--train_data_dir", str(fx / "train"), "--resolution", str(resolution), "--caption_extension", ".caption",
            "--output_dir", str(out), "--output_name", "bench", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "1", "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
            "--train_batch_size", str(batch), "--mixed_precision", "no", "--max_data_loader_n_workers", "0",
            "--seed", "1", "--max_train_steps", str(steps)]


def run(args: argparse.Namespace, variant: str, work: Path) -> StampedRun:
    sd = Path(args.sd_scripts).resolve()
    fx = Path(args.fixture).resolve()
    out = Path(tempfile.mkdtemp(dir=work))
    common = kohya_args(fx, out, args.steps, args.batch, args.resolution)
    if VARIANTS[variant]:
        target = "module:smplora_plugin.integrations.kohya"
        argv = ["--sd_scripts", str(sd), "train_network.py", *common, *VARIANTS[variant],
                "--privacy_holdout_dir", str(fx / "holdout")]
    else:
        target, argv = str(sd / "train_network.py"), common
    return run_stamped(args.python, target, argv, offline_env(), args.steps, cwd=str(sd), what=variant)


def table(runs: dict, args: argparse.Namespace) -> str:
    names = list(runs)
    steps = {v: [r.mean_step(args.skip) for r in rs] for v, rs in runs.items()}
    med = {v: statistics.median(xs) for v, xs in steps.items()}
    lines = [f"kohya sd-scripts `train_network.py`, fixture of `scripts/kohya/make_tiny_sd15.py` (SD1.5 UNet block "
             f"widths, random weights), {args.resolution} px, batch {args.batch}, fp32, one thread; {args.steps} steps "
             f"per run, mean step of each run (first {args.skip} gaps dropped), {args.rounds} interleaved rounds.\n",
             "| variant | mean step (s), median | per round (s) | vs plain (median) | vs plain, per round | "
             "start to first step (s) | last step to exit (s) | whole run wall (s) | CPU (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in names:
        rs = runs[v]
        per_round = [a / b for a, b in zip(steps[v], steps["plain"])]
        lines.append(
            f"| {v} | {med[v]:.3f} | {', '.join(f'{x:.3f}' for x in steps[v])} | {med[v] / med['plain']:.2f}x | "
            f"{', '.join(f'{x:.2f}x' for x in per_round)} | "
            f"{statistics.median(r.before_first_step for r in rs):.1f} | "
            f"{statistics.median(r.after_last_step for r in rs):.1f} | {statistics.median(r.wall for r in rs):.1f} | "
            f"{statistics.median(r.cpu_s for r in rs):.1f} | {max(r.peak_mib for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sd-scripts", required=True, help="the kohya sd-scripts checkout")
    p.add_argument("--fixture", required=True, help="a folder made by scripts/kohya/make_tiny_sd15.py")
    p.add_argument("--python", default=sys.executable,
                   help="a Python with sd-scripts' requirements and smplora-plugin (default: this one)")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--skip", type=int, default=1, help="first step gaps dropped (warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--variants", default="paper (defaults),robust",
                   help=f"comma-separated, of {', '.join(VARIANTS)} (plain is always run)")
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.steps < args.skip + 3:
        p.error("--steps must leave at least 2 step gaps after --skip")
    if not (Path(args.sd_scripts) / "train_network.py").is_file():
        p.error(f"--sd-scripts {args.sd_scripts}: no train_network.py there; give a kohya sd-scripts checkout")
    if not (Path(args.fixture) / "model" / "unet").is_dir():
        p.error(f"--fixture {args.fixture}: not a fixture folder; make one with scripts/kohya/make_tiny_sd15.py")
    names = ["plain"] + [v for v in args.variants.split(",") if v and v != "plain"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="smplora_kohya_bench_"))
    runs = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[: r % len(names)]:
            runs[v].append(run(args, v, work))
            x = runs[v][-1]
            print(f"round {r} {v}: {x.mean_step(args.skip):.3f} s/step, wall {x.wall:.1f} s", flush=True)
    text = table(runs, args)
    print(text)
    if args.write:
        write_section("kohya_overhead", "## Real sd-scripts: per-step cost (hand-run, `kohya_overhead.py`)\n\n"
                      + header() + "\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
