"""Step overhead of SMP-LoRA in the diffusers example script (the official recipe's flow) on the tiny pipeline.

Runs ``examples/diffusers/train_text_to_image_lora.py`` as a user would (subprocess, offline, one thread)
on the tiny pipeline of ``make_tiny_pipeline.py``: plain LoRA, ``--privacy smplora`` (the README's block
with its defaults) and ``--privacy_preset robust``, rounds interleaved. The script runs unchanged in a
child process that only adds a global ``torch.optim`` step post-hook time-stamping every step of the
training optimiser (AdamW; the attacker's Adam is not counted): a step's time is the gap between two
consecutive stamps (forward, privacy term, backward, optimiser), start-up and saving excluded. We
report the mean step per run (the first ``--skip`` steps dropped; the held-out forward every
``nonmember_every`` steps and the privacy fraction's steps without a privacy row make steps differ, so
the kept gaps should span whole cycles: a multiple of 4), then the median over rounds.

``--script`` runs another copy of the script with the same command line, e.g. diffusers' official
``examples/text_to_image/train_text_to_image_lora.py`` with the docs/diffusers.md block pasted in
(``examples/diffusers/patch_official.py sd1`` writes that copy; the official script needs a tracker:
``--report-to tensorboard``).

Run (from the repository root):  python -m benchmarks.script_overhead --steps 39 --skip 2 --rounds 3 --write
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import header, write_section
from ._stamps import offline_env, run_stamped

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "diffusers" / "train_text_to_image_lora.py"
VARIANTS = {
    "plain": [],
    "smplora (defaults)": ["--privacy", "smplora"],
    "smplora robust": ["--privacy", "smplora", "--privacy_preset", "robust"],
    "dpsgd": ["--privacy", "dpsgd", "--privacy_noise_multiplier", "1.0"],  # DP-SGD alone: no held-out images
}
DEFAULT_VARIANTS = ("plain", "smplora (defaults)", "smplora robust")


def run(root: Path, variant: str, steps: int, batch: int, skip: int, script: Path = SCRIPT,
        report_to: str = "none") -> float:
    """Mean seconds per training step of one run of the script."""
    out = Path(tempfile.mkdtemp(dir=root))
    needs_holdout = "smplora" in VARIANTS[variant]
    extra = VARIANTS[variant] + (["--privacy_holdout_dir", str(root / "holdout")] if needs_holdout else [])
    args = ["--pretrained_model_name_or_path", str(root / "pipeline"),
           "--train_data_dir", str(root / "train"), "--resolution", "32", "--center_crop",
           "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
           "--lr_warmup_steps", "0", "--seed", "0", "--report_to", report_to, "--output_dir", str(out), *extra]
    return run_stamped(sys.executable, str(script), args, _env(), steps, what=variant).mean_step(skip)


def _env() -> dict:
    return offline_env(SMPLORA_DISABLE_PLUGINS="1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=39)
    p.add_argument("--skip", type=int, default=2, help="first step gaps dropped (warm-up)")
    p.add_argument("--script", default=str(SCRIPT), help="the training script (default: the repo's example)")
    p.add_argument("--section", default="script_overhead", help="RESULTS.md section to write")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report-to", default="none",
                   help="the script's --report_to (diffusers' official scripts need a tracker, e.g. tensorboard)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (plain is always run)")
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.steps < args.skip + 3:
        p.error("--steps must leave at least 2 step gaps after --skip")
    names = ["plain"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "plain"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    root = Path(tempfile.mkdtemp(prefix="smplora_script_bench_"))
    subprocess.run([sys.executable, str(REPO / "examples" / "diffusers" / "make_tiny_pipeline.py"), "--out", str(root),
                    "--digits", "32", "--holdout", "16"], check=True, capture_output=True, env=_env())
    per_step = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[: r % len(names)]:
            per_step[v].append(run(root, v, args.steps, args.batch, args.skip, Path(args.script), args.report_to))
            print(f"round {r} {v}: {per_step[v][-1] * 1e3:.1f} ms/step", flush=True)
    med = {v: statistics.median(xs) for v, xs in per_step.items()}
    shown = Path(args.script).resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown.name + " (a scratch copy, not shipped)"
    lines = [f"Script `{shown}`; tiny pipeline (`make_tiny_pipeline.py --digits 32`: UNet blocks 16/32, 32 px "
             f"images), batch {args.batch}, one thread; {args.steps} steps per run, mean step time of each run "
             f"(first {args.skip} gaps dropped), median of {args.rounds} interleaved rounds.\n",
             "| variant | ms per step (mean) | per round (ms) | vs plain |", "|---|---|---|---|"]
    for v in names:
        lines.append(f"| {v} | {med[v] * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in per_step[v])} | "
                     f"{med[v] / med['plain']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        title = ("the diffusers example script" if args.section == "script_overhead" else
                 "the official diffusers script with the README block")
        write_section(args.section, f"## Step overhead in {title} (tiny pipeline)\n\n" + header() + "\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
