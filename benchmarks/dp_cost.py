"""DP-SGD step cost at SD1.5 size (issue 26, item 6): a plain LoRA step against the same step under ``DPTraining``.

Model: diffusers' ``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration (built in code, random
init, nothing downloaded: blocks 320/640/1280/1280, 2 layers per block, 8 attention heads, 768-wide text
states of 77 tokens) carrying a peft LoRA of rank 4 on ``to_q``/``to_k``/``to_v``/``to_out.0``, as diffusers'
``train_text_to_image_lora.py`` adds it (alpha = rank, gaussian init). SD1.5 trains at 512 px, i.e. 64x64
latents (``--latent 64``, the default; ``--latent 32`` for a slower machine).

Variants, at each batch size and precision (fp32, or ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
``--precisions fp32,bf16``: only on a CPU with native bf16 (AVX512-BF16 / AMX); on an AVX2-only CPU
oneDNN's bf16 fallbacks make a 3x3 convolution ~500x and a matmul ~40x slower than fp32, so an SD1.5 bf16
step takes tens of minutes and measures the fallback, not the DP cost):

- ``plain``: forward, MSE against the noise, backward, SGD step, ``zero_grad``;
- ``dp``: the same loop with ``DPTraining(capture="hooks")`` attached, as a trainer's shim runs it:
  ``dpt.collect()`` at the start of the micro-batch, the trainer's own backward (per-sample gradients by
  hooks on the LoRA layers) and ``optimizer.step()``, whose pre-hook clips, sums, noises and writes the
  DP gradient (sigma 1, clip 1).

Time: one process holds one frozen UNet with one LoRA; every variant has its own optimiser (the DP
variant's ``DPTraining`` is attached only around its own steps), and the variants' steps are interleaved
round by round (the order alternates, ABAB / BABA), so machine load hits them alike. The first
``--warmup`` rounds are dropped; we report the min and the median of the timed steps, the ratio DP /
plain of both, and the median of the per-round ratios (each DP step against the plain step of the same
configuration in the same round). Memory: each variant runs alone in a fresh child process, which
builds the model, resets the kernel's resident high-water mark (``/proc/self/clear_refs``), runs
``--memory-steps`` steps and reports ``VmHWM`` (peak resident set), total and above the resident size
before its first step. The per-sample-gradient buffer is batch x LoRA parameters x 4 bytes (fp32).

Run (from the repository root):
    nice -n 10 python -m benchmarks.dp_cost --threads 1 --out rows.jsonl --write
    python -m benchmarks.dp_cost --quick --out /tmp/rows.jsonl        # tiny config, seconds (the test's)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._common import header, status_kib, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "dp_cost"
VARIANTS = ("plain", "dp")
PRECISIONS = ("fp32", "bf16")

#: Stable Diffusion 1.5's UNet (``runwayml/stable-diffusion-v1-5/unet/config.json``), written out here.
SD15_UNET: Dict[str, Any] = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1,
)
#: a tiny UNet of the same layout for ``--quick`` (the test): seconds, not hours
QUICK_UNET: Dict[str, Any] = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
SD15_TOKENS, QUICK_TOKENS = 77, 4
QUICK_LATENT = 8
LORA_RANK = 4
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py


# ---------------------------------------------------------------------------------------------
# the model


def unet_config(quick: bool, latent: int) -> Dict[str, Any]:
    """The UNet's keyword arguments: SD1.5's (or the tiny ``--quick`` one) at ``latent`` x ``latent``."""
    return dict(QUICK_UNET if quick else SD15_UNET, sample_size=latent)


def build_unet(config: Dict[str, Any], rank: int = LORA_RANK, seed: int = 0):
    """A frozen, seeded random-init ``UNet2DConditionModel`` with a trainable peft LoRA on the attention projections."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    return unet


def sd15_scheduler():
    """SD1.5's DDPM training schedule (1000 steps, scaled_linear 0.00085-0.012, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon")


def lora_parameters(unet) -> int:
    """The number of trainable (LoRA) parameters."""
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def autocast(precision: str):
    """The forward's context: nothing (fp32) or CPU bf16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Batches:
    """Seeded data: latents, text states, noise and timesteps, drawn per call from one generator."""

    def __init__(self, latent: int, tokens: int, width: int, seed: int = 0, pool: int = 16):
        self.g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(pool, 4, latent, latent, generator=self.g)
        self.text = torch.randn(pool, tokens, width, generator=self.g)
        self.i = 0

    def next(self, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.arange(self.i, self.i + n) % self.latents.shape[0]
        self.i += n
        noise = torch.randn(n, *self.latents.shape[1:], generator=self.g)
        t = torch.randint(0, 1000, (n,), generator=self.g)
        return self.latents[idx], self.text[idx], noise, t


# ---------------------------------------------------------------------------------------------
# the two steps


class Bench:
    """One UNet with one LoRA; a plain SGD optimiser, and per batch size a DP one with its ``DPTraining``."""

    def __init__(self, quick: bool, latent: int, batches: Sequence[int], seed: int = 0, lr: float = 1e-5):
        from smplora_plugin.dp import DPTraining, check_mixed_precision, dp_options

        self.unet = build_unet(unet_config(quick, latent), seed=seed)
        self.sched = sd15_scheduler()
        cfg = QUICK_UNET if quick else SD15_UNET
        self.data = Batches(latent, QUICK_TOKENS if quick else SD15_TOKENS, cfg["cross_attention_dim"], seed)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.plain_opt = torch.optim.SGD(params, lr=lr)
        for precision in PRECISIONS:
            check_mixed_precision(precision)  # bf16 autocast is allowed under DP (fp16 would be refused)
        opts = dp_options("dpsgd", noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)
        self.dp: Dict[int, Tuple[Any, torch.optim.Optimizer]] = {}
        for b in batches:
            opt = torch.optim.SGD(params, lr=lr)
            dpt = DPTraining(self.unet, opts, dataset_size=max(1000, 10 * b), batch_size=b, capture="hooks")
            dpt.attach(opt)
            dpt.detach()  # attached only around this variant's own steps
            self.dp[b] = (dpt, opt)

    def _loss(self, b: int, precision: str) -> torch.Tensor:
        z0, text, noise, t = self.data.next(b)
        noisy = self.sched.add_noise(z0, noise, t)
        with autocast(precision):
            pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        return F.mse_loss(pred.float(), noise.float())

    def step(self, variant: str, b: int, precision: str) -> float:
        """One training step of ``variant``; returns its wall seconds (the DP variant's attach/detach excluded)
        and keeps its CPU seconds (this process's, ``time.process_time``) in :attr:`last_cpu`."""
        if variant == "plain":
            t0, c0 = time.perf_counter(), time.process_time()
            self._loss(b, precision).backward()
            self.plain_opt.step()
            self.plain_opt.zero_grad(set_to_none=True)
            self.last_cpu = time.process_time() - c0
            return time.perf_counter() - t0
        if variant != "dp":
            raise ValueError(f"variant {variant!r}: choose from {VARIANTS}")
        dpt, opt = self.dp[b]
        dpt.attach(opt)
        steps = dpt.dp.steps
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            dpt.collect()             # the shim's call at the start of the micro-batch's loss
            self._loss(b, precision).backward()
            opt.step()                # pre-hook: collect, discard the trainer's gradient, write the noised one
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            self.last_cpu = time.process_time() - c0
        finally:
            dpt.detach()
        if dpt.dp.steps != steps + 1 or dpt.last_norms is None or dpt.last_norms.numel() != b:
            raise RuntimeError(f"the DP step at batch {b} did not run through DPTraining (steps {dpt.dp.steps}, "
                               f"norms {None if dpt.last_norms is None else dpt.last_norms.numel()})")
        return elapsed


def configs(batches: Sequence[int], precisions: Sequence[str]) -> List[Tuple[str, int]]:
    return [(p, b) for p in precisions for b in batches]


def time_variants(bench: Bench, batches: Sequence[int], precisions: Sequence[str], repeats: int,
                  warmup: int, log=None) -> Tuple[Dict[Tuple[str, int, str], List[float]], Dict[Tuple[str, int, str],
                                                                                         List[float]]]:
    """Interleaved timed steps, wall and CPU seconds: every round runs each configuration's two variants back to
    back, the order alternating between rounds; the first ``warmup`` rounds are not kept."""
    times: Dict[Tuple[str, int, str], List[float]] = {}
    cpu: Dict[Tuple[str, int, str], List[float]] = {}
    for r in range(warmup + repeats):
        for precision, b in configs(batches, precisions):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                s = bench.step(v, b, precision)
                if r >= warmup:
                    times.setdefault((precision, b, v), []).append(s)
                    cpu.setdefault((precision, b, v), []).append(bench.last_cpu)
                if log:
                    log(f"round {r} {'warm-up' if r < warmup else 'timed'} {precision} b{b} {v}: {s:.2f} s "
                        f"(CPU {bench.last_cpu:.2f} s)")
    return times, cpu


# ---------------------------------------------------------------------------------------------
# memory, one variant per fresh child process


def memory_child(quick: bool, latent: int, variant: str, b: int, precision: str, steps: int) -> Dict[str, int]:
    """Peak resident memory (VmHWM) of ``steps`` steps of one variant, the model's build not counted."""
    import gc

    bench = Bench(quick, latent, [b])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")
    before = status_kib("VmRSS")
    for _ in range(steps):
        bench.step(variant, b, precision)
    # the kernel syncs its per-thread RSS counters lazily, so VmHWM can trail an RSS already read
    peak = max(status_kib("VmHWM"), status_kib("VmRSS"), before)
    return {"before_kib": before, "peak_kib": peak}


def measure_memory(quick: bool, latent: int, batches: Sequence[int], precisions: Sequence[str], steps: int,
                   threads: int, log=None) -> Dict[Tuple[str, int, str], Dict[str, int]]:
    out = {}
    for precision, b in configs(batches, precisions):
        for v in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.dp_cost", "--memory-child", v, "--batches", str(b),
                   "--precisions", precision, "--latent", str(latent), "--memory-steps", str(steps),
                   "--threads", str(threads)] + (["--quick"] if quick else [])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if res.returncode != 0:
                raise RuntimeError(f"memory child {v} {precision} b{b} failed:\n{res.stderr[-3000:]}")
            out[(precision, b, v)] = json.loads(res.stdout.strip().splitlines()[-1])
            if log:
                log(f"memory {precision} b{b} {v}: peak {out[(precision, b, v)]['peak_kib'] / 1024:.0f} MiB")
    return out


# ---------------------------------------------------------------------------------------------
# rows and the table


def rows(times, memory, lora_params: int, meta: Dict[str, Any], cpu=None) -> List[Dict[str, Any]]:
    """One row per (precision, batch, variant): the timed steps (wall; CPU when given), min / median, peak memory,
    buffer size."""
    out = []
    for (precision, b, v), ts in sorted(times.items(), key=lambda kv: (PRECISIONS.index(kv[0][0]), kv[0][1],
                                                                        VARIANTS.index(kv[0][2]))):
        row = {**meta, "precision": precision, "batch": b, "variant": v, "step_s": ts, "min_s": min(ts),
               "median_s": statistics.median(ts), "lora_params": lora_params,
               "per_sample_grad_bytes": b * lora_params * 4 if v == "dp" else 0}
        if cpu is not None:
            cs = cpu[(precision, b, v)]
            row.update(cpu_s=cs, cpu_min_s=min(cs), cpu_median_s=statistics.median(cs))
        if memory is not None:
            row.update(memory[(precision, b, v)])
        out.append(row)
    return out


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def table(rows_: List[Dict[str, Any]]) -> str:
    """The Markdown table: per (precision, batch) the plain and DP step times, their ratios and memory."""
    by = {(r["precision"], r["batch"], r["variant"]): r for r in rows_}
    mem = all("peak_kib" in r for r in rows_)
    cpu = all("cpu_s" in r for r in rows_)
    head = ("| precision | batch | plain s/step min / median | DP s/step min / median | DP/plain (min) | "
            "DP/plain (median) | DP/plain per round (median, range) |")
    sep = "|---|---|---|---|---|---|---|"
    if cpu:
        head += " CPU s/step median plain / DP | DP/plain CPU (min / median) |"
        sep += "---|---|"
    head += " per-sample grad buffer (MB) |"
    sep += "---|"
    if mem:
        head += " peak RSS plain / DP (MiB) | peak DP/plain | step growth plain / DP (MiB) | growth DP/plain |"
        sep += "---|---|---|---|"
    lines = [head, sep]
    for precision in PRECISIONS:
        for b in sorted({k[1] for k in by if k[0] == precision}):
            p, d = by[(precision, b, "plain")], by[(precision, b, "dp")]
            paired = [y / x for x, y in zip(p["step_s"], d["step_s"])]
            line = (f"| {precision} | {b} | {p['min_s']:.2f} / {p['median_s']:.2f} | {d['min_s']:.2f} / "
                    f"{d['median_s']:.2f} | {d['min_s'] / p['min_s']:.3f}x | {d['median_s'] / p['median_s']:.3f}x | "
                    f"{statistics.median(paired):.3f}x ({min(paired):.3f}-{max(paired):.3f}) |")
            if cpu:
                line += (f" {p['cpu_median_s']:.2f} / {d['cpu_median_s']:.2f} | {d['cpu_min_s'] / p['cpu_min_s']:.3f}x"
                         f" / {d['cpu_median_s'] / p['cpu_median_s']:.3f}x |")
            line += f" {d['per_sample_grad_bytes'] / 1e6:.1f} |"
            if mem:
                gp, gd = p["peak_kib"] - p["before_kib"], d["peak_kib"] - d["before_kib"]
                line += (f" {_mib(p['peak_kib'])} / {_mib(d['peak_kib'])} | {d['peak_kib'] / p['peak_kib']:.3f}x | "
                         f"{_mib(gp)} / {_mib(gd)} | {gd / max(gp, 1):.3f}x |")
            lines.append(line)
    return "\n".join(lines) + "\n"


def describe(args, lora_params: int, repeats: int, load: Tuple[Tuple[float, ...], Tuple[float, ...]],
             wall: float) -> str:
    size = "tiny --quick UNet (blocks 32/64)" if args.quick else "SD1.5's UNet (random init)"
    return (f"{size}, latents 4x{args.latent}x{args.latent}, text states {QUICK_TOKENS if args.quick else SD15_TOKENS}"
            f" tokens, LoRA rank {LORA_RANK} on {'/'.join(LORA_TARGETS)} ({lora_params:,} parameters), SGD; DP: "
            f"`DPTraining(capture=\"hooks\")`, sigma 1, clip 1. {repeats} timed steps per variant after "
            f"{args.warmup} warm-up round(s), interleaved (ABAB/BABA); {torch.get_num_threads()} torch thread(s). "
            f"Load average (1/5/15 min) at the start {'/'.join(f'{x:.1f}' for x in load[0])}, at the end "
            f"{'/'.join(f'{x:.1f}' for x in load[1])}; timing wall {wall / 60:.0f} min. Peak memory: each variant "
            f"alone in a fresh process, VmHWM over {args.memory_steps} step(s) after the build (clear_refs reset); "
            "'step growth' is that peak above the resident size before the first step. 'CPU s': the process's "
            "CPU time per step (`time.process_time`), which other processes on the machine inflate less than the "
            "wall time (one torch thread).\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny UNet (8x8 latents): the test's seconds-long run")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64: SD1.5's 512 px; --quick: 8)")
    p.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (CPU autocast; only on a CPU "
                   "with native bf16, AVX512-BF16 / AMX: without it a bf16 step at SD1.5 size takes ~50x longer)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not timed)")
    p.add_argument("--memory-steps", type=int, default=1, help="steps of each memory child (0: memory not measured)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows as JSON lines here")
    p.add_argument("--write", action="store_true", help="write the section into --results-file")
    p.add_argument("--results-file", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--section", default=SECTION, help="the section's marker name (default dp_cost)")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.latent = args.latent or (QUICK_LATENT if args.quick else 64)
    batches = [int(x) for x in args.batches.split(",") if x]
    precisions = [x for x in args.precisions.split(",") if x]
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad or not batches or min(batches) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error(f"--precisions from {PRECISIONS}; --batches >= 1; --repeats >= 1; --warmup >= 0 (got {bad or args})")
    if "bf16" in precisions and not args.quick and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        print(f"warning: this CPU's capability is {torch.backends.cpu.get_cpu_capability()} (no native bf16): bf16 "
              "convolutions and matmuls run on slow fallback kernels, so bf16 steps take far longer than fp32 here "
              "and their ratio says nothing about a bf16-capable machine.", file=sys.stderr)
    if args.memory_child:
        print(json.dumps(memory_child(args.quick, args.latent, args.memory_child, batches[0], precisions[0],
                                      max(1, args.memory_steps))))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    t0 = time.time()
    bench = Bench(args.quick, args.latent, batches)
    n_lora = lora_parameters(bench.unet)
    times, cpu = time_variants(bench, batches, precisions, args.repeats, args.warmup, log)
    wall = time.time() - t0
    del bench
    memory = (measure_memory(args.quick, args.latent, batches, precisions, args.memory_steps, args.threads, log)
              if args.memory_steps else None)
    load1 = os.getloadavg()
    meta = {"quick": args.quick, "latent": args.latent, "threads": torch.get_num_threads(), "rank": LORA_RANK}
    out_rows = rows(times, memory, n_lora, meta, cpu)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in out_rows:
                f.write(json.dumps(r) + "\n")
    text = describe(args, n_lora, args.repeats, (load0, load1), wall) + "\n" + table(out_rows)
    print(text)
    if args.write:
        title = f"## DP-SGD step cost at SD1.5 scale, {args.latent}x{args.latent} latents (issue 26)"
        write_section(args.section, title + "\n\n" + header() + "\n" + text, Path(args.results_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
