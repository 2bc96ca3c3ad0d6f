"""Step overhead of SMP-LoRA against plain LoRA and the reference algorithm (issue 5, part 1).

Time: every variant trains its own LoRA (and optimiser) on one shared frozen UNet (its LoRA weights
are swapped in for its step), and the variants' steps are interleaved in one process (round-robin,
rotating the order), so machine noise hits them alike; we report the median and the inter-quartile
range of each variant's step time and the ratio of medians to plain LoRA, and split the SMP cost into
the extra UNet forwards (held-out, base) and the regulariser's fixed cost (loss maps and pooling, the
attacker update, its CE, bookkeeping). Memory: each variant runs alone in a child process and reports
its peak resident memory (VmHWM), total and above the resident size before its first step.

Sizes: ``small`` / ``unet`` (tiny UNets), ``sd15`` (SD1.5's UNet2DConditionModel shape, random init:
blocks 320/640/1280/1280, 2 layers per block, 768-wide text states of 77 tokens, 64x64 latents, batch 1)
in fp32 and ``sd15-bf16`` (the same under CPU bf16 autocast). Every SMP variant uses the library's
feature grid unless the size names one.

Variants:
- plain: forward, MSE, backward, AdamW step.
- smp-every: this project's SMP-LoRA with the paper's schedule: the member loss map comes from
  the training forward; one no-grad forward on an equal-size non-member batch every step.
- smp-default: this project's SMP-LoRA with the library defaults (``PrivacyConfig()``).
- smp-robust-full: base-calibrated features on the whole batch, i.e. one more no-grad forward with
  the LoRA disabled for the member batch (and for the non-member batch when it is refreshed).
- smp-robust: the ``robust`` preset as it ships: the same, with ``privacy_fraction=0.25``: the
  privacy term, the base forward and the non-member forwards on a quarter of the batch.
- reference: the reference code's step: a second forward/backward with fresh noise for the
  adversarial term, and per attacker step no-grad forwards of an auxiliary member batch and an
  auxiliary non-member batch.

Run (from the repository root):  python -m benchmarks.step_overhead --steps 20 --write
      python -m benchmarks.step_overhead --sizes sd15,sd15-bf16 --variants plain,smp-default,smp-robust \
          --steps 3 --warmup 1 --memory-steps 1 --threads 1 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from smplora_plugin import PrivacyConfig, PrivacyRegularizer

from ._common import header, status_kib, write_section

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    # the attacker and the per-step bookkeeping weigh most here
    "small": dict(blocks=(32, 64), latent=16, batch=8, cross=32),
    # the UNet dominates: wider blocks, 32x32 latents
    "unet": dict(blocks=(64, 128, 128), latent=32, batch=4, cross=64),
    # SD1.5's UNet at 512 px (random init), fp32 and CPU bf16 autocast
    "sd15": dict(blocks=(320, 640, 1280, 1280), latent=64, batch=1, cross=768, tokens=77, layers=2),
    "sd15-bf16": dict(blocks=(320, 640, 1280, 1280), latent=64, batch=1, cross=768, tokens=77, layers=2,
                      autocast="bf16"),
    "sd15-b2": dict(blocks=(320, 640, 1280, 1280), latent=64, batch=2, cross=768, tokens=77, layers=2),
    # for the smoke test only
    "toy": dict(blocks=(32, 32), latent=8, batch=2, grid=8, cross=32),
}
VARIANTS = ("plain", "smp-every", "smp-default", "smp-robust-full", "smp-robust", "reference")
SMP_VARIANTS = ("smp-every", "smp-default", "smp-robust-full", "smp-robust")
FIXED_FEATURES = "regulariser: loss maps + pooling"
FIXED_STEP = "regulariser: attacker update + CE + bookkeeping"
EXTRA_FORWARDS = ("non-member forward", "base forward (calibration)", "second forward", "auxiliary forwards")


def build(size: dict, seed: int = 0):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    n = len(size["blocks"])
    unet = UNet2DConditionModel(
        sample_size=size["latent"], in_channels=4, out_channels=4, layers_per_block=size.get("layers", 1),
        block_out_channels=size["blocks"], cross_attention_dim=size["cross"], attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), norm_num_groups=32,
    )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet, DDPMScheduler(num_train_timesteps=1000)


class Batches:
    """Fixed, seeded data: latents, text states, noise and timesteps per call."""

    def __init__(self, size: dict, seed: int):
        g = torch.Generator().manual_seed(seed)
        s = size["latent"]
        self.latents = torch.randn(64, 4, s, s, generator=g)
        self.text = torch.randn(64, size.get("tokens", 4), size["cross"], generator=g)
        self.size, self.g, self.i = size, g, 0

    def next(self, n: int):
        idx = torch.arange(self.i, self.i + n) % len(self.latents)
        self.i += n
        noise = torch.randn(n, *self.latents.shape[1:], generator=self.g)
        t = torch.randint(0, 1000, (n,), generator=self.g)
        return self.latents[idx], self.text[idx], noise, t


def forward(unet, sched, data, autocast=None):
    latents, text, noise, t = data
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
        pred = unet(sched.add_noise(latents, noise, t), t, text).sample
    return pred, noise


class Runner:
    """One variant: its own LoRA weights, optimiser and (for SMP) regulariser, on the shared frozen UNet."""

    def __init__(self, variant: str, size: dict, unet, sched):
        self.variant, self.size, self.sched, self.unet = variant, size, sched, unet
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.lora = [p.detach().clone() for p in self.params]   # this variant's LoRA, swapped in for its steps
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.members = Batches(size, seed=1)
        self.nonmembers = Batches(size, seed=2)
        self.sections = defaultdict(float)
        self.kind_sections = defaultdict(lambda: defaultdict(float))   # per step kind: summed section times
        self.kind_counts = defaultdict(int)
        self.kind = "every step"
        grid = {"feature_grid": size["grid"]} if "grid" in size else {}
        if variant == "smp-every":
            self.reg = PrivacyRegularizer(nonmember_every=1, **grid)
        elif variant == "smp-default":
            self.reg = PrivacyRegularizer(PrivacyConfig(**grid))
        elif variant == "smp-robust-full":
            self.reg = PrivacyRegularizer(PrivacyConfig.preset("robust", privacy_fraction=1.0, **grid))
        elif variant == "smp-robust":
            self.reg = PrivacyRegularizer(PrivacyConfig.preset("robust", **grid))
        elif variant == "reference":
            self.reg = PrivacyRegularizer(**grid)  # only its attacker + optimiser are used
            self.aux_m, self.aux_n = Batches(size, seed=3), Batches(size, seed=4)

    def _fwd(self, data):
        return forward(self.unet, self.sched, data, self.size.get("autocast"))

    def _base(self, data):
        """The base model's prediction (LoRA off) when the regulariser wants calibrated features."""
        if not self.reg.config.calibrated:
            return None
        self.unet.disable_adapters()
        try:
            with torch.no_grad():
                return self._fwd(data)[0]
        finally:
            self.unet.enable_adapters()

    def _tick(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.sections[name] += t1 - t0
        return t1

    def step(self) -> None:
        with torch.no_grad():
            for p, mine in zip(self.params, self.lora):
                p.copy_(mine)
        before = dict(self.sections)
        try:
            self._step()
        finally:
            with torch.no_grad():
                for p, mine in zip(self.params, self.lora):
                    mine.copy_(p)
        for name, total in self.sections.items():
            self.kind_sections[self.kind][name] += total - before.get(name, 0.0)
        self.kind_counts[self.kind] += 1

    def amortised_sections(self, shares: dict) -> dict:
        """Mean seconds per step of each section, each step kind weighted by its long-run share."""
        out = defaultdict(float)
        for kind, share in shares.items():
            if self.kind_counts.get(kind):
                for name, total in self.kind_sections[kind].items():
                    out[name] += share * total / self.kind_counts[kind]
        return dict(out)

    def fresh_regularizer(self) -> None:
        """After the warm-up: a new regulariser with the same config (timed steps start the schedule at 0),
        and the section timers cleared."""
        if self.variant in SMP_VARIANTS:
            self.reg = PrivacyRegularizer(self.reg.config)
        self.sections.clear()
        self.kind_sections.clear()
        self.kind_counts.clear()

    def _step(self) -> None:
        b = self.size["batch"]
        t0 = time.perf_counter()
        smp = self.variant in SMP_VARIANTS
        n = self.reg.privacy_rows(b) if smp else b
        nonmember = None
        self.kind = step_kind(n if smp else None, smp and n > 0 and self.reg.wants_nonmembers())
        if smp and n > 0 and self.reg.wants_nonmembers():
            # before the training forward, so its activations don't coexist with the training graph
            data = self.nonmembers.next(self.reg.nonmember_rows(b))
            with torch.no_grad():
                out = self._fwd(data)
                t0 = self._tick("non-member forward", t0)
                reference = self._base(data)
                t0 = self._tick("base forward (calibration)", t0)
                nonmember = self.reg.features(*out, reference=reference)
            t0 = self._tick(FIXED_FEATURES, t0)
        data = self.members.next(b)
        pred, target = self._fwd(data)
        loss = F.mse_loss(pred.float(), target.float())
        t0 = self._tick("forward", t0)
        if smp and n == 0:   # privacy_fraction over steps: no privacy row on this step
            loss = self.reg.step(loss, None)
            t0 = self._tick(FIXED_STEP, t0)
        elif smp:
            reference = self._base(tuple(x[:n] for x in data))
            t0 = self._tick("base forward (calibration)", t0)
            member = self.reg.features(pred[:n], target[:n], reference=reference)
            t0 = self._tick(FIXED_FEATURES, t0)
            loss = self.reg.step(loss, member, nonmember)
            t0 = self._tick(FIXED_STEP, t0)
        elif self.variant == "reference":
            reg = self.reg
            pred2, target2 = self._fwd(self.members.next(b))  # fresh noise and t
            t0 = self._tick("second forward", t0)
            ce = reg.member_ce(reg.features(pred2, target2))
            loss = loss / (reg.config.beta + reg.config.alpha * ce + reg.config.delta)
            t0 = self._tick(FIXED_STEP, t0)
        loss.backward()
        t0 = self._tick("backward", t0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t0 = self._tick("optimiser", t0)
        if self.variant == "reference":  # after the LoRA step: k attacker steps on auxiliary batches
            for _ in range(self.reg.config.k_steps):
                with torch.no_grad():
                    m = self.reg.features(*self._fwd(self.aux_m.next(b)))
                    n = self.reg.features(*self._fwd(self.aux_n.next(b)))
                t0 = self._tick("auxiliary forwards", t0)
                self.reg.update_attacker(m, n)
                t0 = self._tick(FIXED_STEP, t0)


def step_kind(rows, refresh: bool) -> str:
    """What a step ran: the same work every step (no regulariser, or the reference's), a privacy term (with
    or without a held-out forward), or none."""
    if rows is None:
        return "every step"
    if rows == 0:
        return "no privacy row"
    return "privacy + held-out forward" if refresh else "privacy"


def kind_shares(config: PrivacyConfig, batch: int, steps: int = 4096) -> dict:
    """The long-run share of each :func:`step_kind` under ``config``'s deterministic schedule (privacy rows
    per step, attacker updates on steps with rows, a held-out refresh every ``nonmember_every`` updates)."""
    counts, updates = defaultdict(int), 0
    for k in range(steps):
        rows = config.privacy_rows(batch, k)
        refresh = rows > 0 and config.k_steps > 0 and updates % config.nonmember_every == 0
        counts[step_kind(rows, refresh)] += 1
        updates += rows > 0 and config.k_steps > 0
    return {kind: c / steps for kind, c in counts.items()}


def time_variants(size_name: str, steps: int, warmup: int, variants=VARIANTS):
    """Interleaved timed steps per variant, each labelled with its :func:`step_kind`; the regularisers are
    made afresh after the warm-up, so the timed steps start their schedules at step 0."""
    size = SIZES[size_name]
    base, sched = build(size)
    variants = tuple(variants)
    runners = {v: Runner(v, size, base, sched) for v in variants}
    times = defaultdict(list)
    kinds = defaultdict(lambda: defaultdict(list))
    for r in range(warmup + steps):
        if r == warmup:
            for runner in runners.values():
                runner.fresh_regularizer()
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            runners[v].step()
            if r >= warmup:
                times[v].append(time.perf_counter() - t0)
                kinds[v][runners[v].kind].append(times[v][-1])
    grids = {v: getattr(getattr(runners[v], "reg", None), "input_grid", None) for v in variants}
    shares = {v: kind_shares(runners[v].reg.config, size["batch"]) if v in SMP_VARIANTS else {"every step": 1.0}
              for v in variants}
    sections = {v: runners[v].amortised_sections(shares[v]) for v in variants}
    return times, sections, grids, kinds, shares


def amortised(kinds: dict, shares: dict):
    """The long-run mean step: each kind's median timed step weighted by its schedule share (``None`` when
    a kind with a share was never timed: run more steps)."""
    if any(share > 0 and not kinds.get(kind) for kind, share in shares.items()):
        return None
    return sum(share * statistics.median(kinds[kind]) for kind, share in shares.items() if share > 0)


def memory_child(size_name: str, variant: str, steps: int) -> dict:
    size = SIZES[size_name]
    base, sched = build(size)
    runner = Runner(variant, size, base, sched)
    del base
    import gc

    gc.collect()
    _reset_peak_rss()
    before = status_kib("VmRSS")
    for _ in range(steps):
        runner.step()
    # the kernel syncs its per-thread RSS counters lazily, so VmHWM can trail an RSS already read
    peak = max(status_kib("VmHWM"), status_kib("VmRSS"), before)
    return {"before_kib": before, "peak_kib": peak}


def _reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) so construction peaks don't count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(size_name: str, steps: int, variants=VARIANTS, threads: int = 0) -> dict:
    out = {}
    for v in variants:
        res = subprocess.run([sys.executable, "-m", "benchmarks.step_overhead", "--memory-child", v, "--sizes",
                              size_name, "--steps", str(steps), "--threads", str(threads)], capture_output=True,
                             text=True, check=True, cwd=REPO)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def report(size_name: str, times, sections, memory, grids=None, kinds=None, shares=None) -> str:
    size = SIZES[size_name]
    variants = [v for v in VARIANTS if v in times]
    mean = {v: amortised(kinds[v], shares[v]) for v in variants}
    grid = ", ".join(sorted({f"{g[0]}x{g[1]}" for g in (grids or {}).values() if g})) or "n/a"
    lines = [
        f"**{size_name}**: UNet blocks {size['blocks']}, {size.get('layers', 1)} layer(s) per block, latents "
        f"4x{size['latent']}x{size['latent']}, batch {size['batch']}, "
        f"{'CPU bf16 autocast' if size.get('autocast') == 'bf16' else 'fp32'}, attacker input grid {grid}, "
        f"LoRA r=8 on attention; {len(times['plain'])} interleaved steps per variant. A variant's steps differ in "
        "kind (a privacy term or none, a held-out forward or none: `privacy_fraction` and `nonmember_every` are "
        "deterministic schedules), so the step time is the long-run mean: each kind's median timed step "
        "weighted by its share of a long run of the schedule (column 'kinds').\n",
        "| variant | long-run step (ms) | time vs plain | kinds: share, timed steps, median (ms) | "
        "extra forwards (ms/step) | regulariser fixed cost (ms/step) | peak RSS (MiB) | peak vs plain | "
        "growth over start (MiB) | growth vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if memory is None:
        lines[-2] = lines[-2].split(" | peak RSS")[0] + " |"
        lines[-1] = "|---|---|---|---|---|---|"
    else:
        base_peak = memory["plain"]["peak_kib"]
        base_growth = max(memory["plain"]["peak_kib"] - memory["plain"]["before_kib"], 1)
    for v in variants:
        extra = sum(sections[v].get(k, 0) for k in EXTRA_FORWARDS)
        fixed = sections[v].get(FIXED_FEATURES, 0) + sections[v].get(FIXED_STEP, 0)
        kind_text = "; ".join(
            f"{k} {share:.3g}, {len(kinds[v].get(k, []))}, "
            + (f"{statistics.median(kinds[v][k]) * 1e3:.0f}" if kinds[v].get(k) else "not timed")
            for k, share in sorted(shares[v].items(), key=lambda kv: -kv[1]))
        step = "n/a" if mean[v] is None else f"{mean[v] * 1e3:.1f}"
        ratio = "n/a" if mean[v] is None or mean["plain"] is None else f"{mean[v] / mean['plain']:.2f}x"
        row = f"| {v} | {step} | {ratio} | {kind_text} | {extra * 1e3:.1f} | {fixed * 1e3:.1f} |"
        if memory is not None:
            growth = memory[v]["peak_kib"] - memory[v]["before_kib"]
            row += (f" {memory[v]['peak_kib'] / 1024:.0f} | {memory[v]['peak_kib'] / base_peak:.2f}x | "
                    f"{growth / 1024:.0f} | {growth / base_growth:.2f}x |")
        lines.append(row)
    lines.append("\nWhere the time goes (ms per step, long-run mean as above):\n")
    names = sorted({k for s in sections.values() for k in s})
    lines.append("| section | " + " | ".join(variants) + " |")
    lines.append("|---|" + "---|" * len(variants))
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{sections[v].get(k, 0) * 1e3:.1f}" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def fixed_cost(grids, steps: int, latent: int = 64, batch: int = 1) -> str:
    """The regulariser's own cost per step without any UNet: loss maps + pooling of a member and a
    non-member batch of ``4 x latent x latent`` maps, ``reg.step`` (attacker update, CE, bookkeeping)
    and the backward through the privacy term, with the library defaults at each grid; and the
    state file size. Median CPU ms (``time.process_time``: not inflated by other processes on a busy
    machine; run it with ``--threads 1``) over ``steps`` steps after one warm-up."""
    import os
    import tempfile

    lines = [f"Regulariser alone (no UNet), 4x{latent}x{latent} maps, batch {batch}, library defaults but the "
             f"grid; median CPU time (process time, {torch.get_num_threads()} torch thread(s)) of {steps} steps after "
             "one warm-up.\n",
             "| feature_grid | attacker input | features (CPU ms) | step + backward (CPU ms) | total (CPU ms) | "
             "state file (MB) |",
             "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for grid in grids:
        reg = PrivacyRegularizer(PrivacyConfig(feature_grid=grid, nonmember_every=1), load_entry_points=False)
        feats_t, step_t = [], []
        for i in range(steps + 1):
            pred = torch.randn(batch, 4, latent, latent, generator=g).requires_grad_(True)
            target = torch.randn(batch, 4, latent, latent, generator=g)
            nm = torch.randn(batch, 4, latent, latent, generator=g)
            loss = (pred - target).pow(2).mean()
            t0 = time.process_time()
            member = reg.features(pred, target)
            with torch.no_grad():
                nonmember = reg.features(nm, target)
            t1 = time.process_time()
            reg.step(loss, member, nonmember).backward()
            t2 = time.process_time()
            if i:
                feats_t.append(t1 - t0)
                step_t.append(t2 - t1)
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        os.close(fd)
        try:
            reg.save(path)
            size = os.path.getsize(path) / 1e6
        finally:
            os.unlink(path)
        f, st = statistics.median(feats_t) * 1e3, statistics.median(step_t) * 1e3
        lines.append(f"| {grid} | {reg.attacker.in_features} | {f:.1f} | {st:.1f} | {f + st:.1f} | {size:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small,unet", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (plain is always run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-steps", type=int, default=4, help="steps of each memory child (0: memory not measured)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    p.add_argument("--section", default=None, help="RESULTS.md section to write (default: step_overhead, or "
                   "step_overhead_sd for the sd15 sizes)")
    p.add_argument("--fixed-cost-grids", default=None,
                   help="comma-separated grids: time the regulariser alone (no UNet) at SD1.5's 64x64 latents "
                        "for each, and write the 'step_overhead_fixed' section")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.sizes, args.memory_child, args.steps)))
        return 0
    if args.fixed_cost_grids:
        text = fixed_cost([int(x) for x in args.fixed_cost_grids.split(",")], args.steps)
        print(text)
        if args.write:
            write_section("step_overhead_fixed", "## The regulariser's fixed cost by grid\n\n" + header() + "\n" + text)
        return 0
    variants = ("plain",) + tuple(v for v in args.variants.split(",") if v and v != "plain")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    sizes = args.sizes.split(",")
    body = [header(), f"Library defaults at the time of the run: `{PrivacyConfig().to_json()}`\n"]
    for name in sizes:
        times, sections, grids, kinds, shares = time_variants(name, args.steps, args.warmup, variants)
        memory = measure_memory(name, args.memory_steps, variants, args.threads) if args.memory_steps else None
        table = report(name, times, sections, memory, grids, kinds, shares)
        print(table, flush=True)
        body.append(table)
    if args.write:
        section = args.section or ("step_overhead_sd" if all(n.startswith("sd15") for n in sizes) else "step_overhead")
        title = "## Step overhead at SD1.5 scale" if section == "step_overhead_sd" else "## Step overhead"
        write_section(section, title + "\n\n" + "\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
