"""Audit cost at SD1.5 size (issue 27, item 6): model passes per sample of each attack, seconds per pass on this CPU,
the extrapolated time of a 200 + 200 audit, and a real small audit at SD1.5 size that checks the extrapolation.

Phases (``--phases``, each appends one JSON row to ``--out``; ``report`` builds the tables from the latest
row of each phase there):

- ``count``: the default suite (``smplora audit``'s, every attack; captions given, so CLiD runs) on the tiny
  pipeline of :mod:`smplora_plugin.tiny_sd` through the real :class:`~smplora_plugin.audit.DiffusersTarget`,
  with counters wrapped around the UNet's ``forward`` (rows, split into no-grad rows and rows with an
  autograd graph, i.e. GSA's) and the VAE's ``encode`` / ``decode``; each attack's ``run`` is wrapped so
  that every pass is charged to the attack that made it. The attacks share cached quantities (the two loss
  grids, SimA, PIA, SecMI, CLiD statistics), so a pass is charged to the first attack that needs it, in the
  suite's order; the standalone cost of the ``--fast`` subset is counted by a second audit of that subset
  alone. The counts depend on the configuration, the number of samples, the distinct captions (generation:
  per distinct caption) and the words per caption (CLiD: one pass per ranked word, at most 16), not on the
  model's size, so the tiny model counts them exactly for SD1.5. Default: 200 + 200 samples, every
  caption distinct, ``--caption-words`` 16 words (CLiD's maximum: the upper end), ``--batch`` 16 (the CLI's
  ``--batch-size``). The engine's own count (``report.json``'s ``model_passes_per_sample``) is kept next to it.
- ``time``: SD1.5's UNet (random init; LoRA rank 4 on the attention projections), VAE and CLIP text encoder
  (SD1.5's configurations, written out here, random init; the tokenizer is :func:`~smplora_plugin.tiny_sd.
  build_tokenizer`'s at 77 tokens) in one ``DiffusersTarget``, fp32 (the audit's default dtype): one no-grad
  noise prediction (text encoder included, as ``target.eps`` runs it) at batch 1 with and without the adapter
  (interleaved, ``--repeats``) and at ``--batch``, one GSA sample (the real ``gradient_norms``: 4 rows with an
  autograd graph, backward to the LoRA), one VAE encode and decode; each with its peak resident memory (VmHWM,
  reset before the operation).
- ``validate``: a real ``run_audit`` at SD1.5 size, end to end, on 8 + 8 samples (4 per split, the minimum)
  with every default attack at a reduced setting (below) in the same process as ``time``; its counted passes
  times the per-row seconds of ``time`` predict each attack's seconds, compared with the measured ones.
- ``report``: per attack, passes per sample, seconds per sample (counted passes x measured seconds per
  row: an extrapolation), hours for 200 + 200 samples, share of the total; the same for the ``--fast``
  subset, with how much of the frontier's upper envelope it keeps (``benchmarks/frontier_rows.jsonl``).

Run (from the repository root; nice -n 10 on a shared machine):
    python -m benchmarks.audit_cost --phases count,time,validate,report --out rows.jsonl --write
    python -m benchmarks.audit_cost --quick --out /tmp/rows.jsonl          # tiny everything: the test's
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from smplora_plugin.audit.attacks import FAST_ATTACKS
from smplora_plugin.audit.references import REFERENCE_ATTACKS  # need reference LoRAs: not in the default suite

from ._common import header, status_kib, write_section
from .dp_cost import LORA_RANK, LORA_TARGETS, build_unet, sd15_scheduler, unet_config

REPO = Path(__file__).resolve().parents[1]
FRONTIER_ROWS = REPO / "benchmarks" / "frontier_rows.jsonl"
SECTION = "audit_cost"
PHASES = ("count", "time", "validate", "report")
KINDS = ("unet_nograd", "unet_grad", "encode", "decode")
CONTEXT, VERDICT = "context (encode)", "verdict + report"
#: ``smplora audit --fast``'s suite (the default suite without GSA and the generation attack)
FAST = FAST_ATTACKS

#: Stable Diffusion 1.5's VAE (``vae/config.json``) and CLIP ViT-L/14 text encoder (``text_encoder/config.json``)
SD15_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
)
SD15_TEXT: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
#: the validation audit's reduced setting: every default attack, a few passes each
VALIDATE_CONFIG: Dict[str, Any] = {
    "timesteps": [300], "draws": 1,
    "attack_options": {"sima": {"timesteps": [0]}, "pia": {"timesteps": [100]}, "secmi": {"t": [11], "step": 10},
                       "clid": {"timesteps": [450], "fractions": [0.5], "max_words": 1}},
}
VALIDATE_GSA = {"timesteps": (100,)}
VALIDATE_GENERATION = {"per_caption": 1, "steps": 1}
VALIDATE_CAPTIONS = 4  # distinct captions among the validation audit's 16 samples


# ---------------------------------------------------------------------------------------------
# the target


def build_target(quick: bool, latent: int = 64, seed: int = 0) -> Tuple[Any, int]:
    """``(DiffusersTarget, image side)``: SD1.5's UNet + LoRA, VAE and text encoder (random init), or the tiny
    pipeline's with the same LoRA. ``lora_B`` is drawn small and non-zero (seeded), so the adapter acts."""
    from diffusers import AutoencoderKL
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    from smplora_plugin.audit import DiffusersTarget
    from smplora_plugin.tiny_sd import TinySDConfig, build_components, build_tokenizer

    if quick:
        cfg = TinySDConfig()
        parts = build_components(cfg)
        unet = parts["unet"]
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
        vae, text, tok, sched, side = (parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                                       cfg.resolution)
    else:
        unet = build_unet(unet_config(False, latent), seed=seed)
        side = latent * 8
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**SD15_VAE, sample_size=side)
        tok = build_tokenizer(max_length=77)
        torch.manual_seed(seed + 2)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        sched = sd15_scheduler()
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return DiffusersTarget(unet, sched, vae=vae, text_encoder=text, tokenizer=tok), side


def make_samples(n: int, side: int, words: int, distinct: Optional[int] = None, seed: int = 0):
    """``n`` seeded random images in [-1, 1] and captions of ``words`` words; ``distinct`` different captions
    (default: every caption different), caption ``i`` being number ``i mod distinct``."""
    from smplora_plugin.tiny_sd import DEFAULT_WORDS

    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, side, side), generator=g) * 2 - 1
    rng = np.random.default_rng(seed)
    distinct = n if distinct is None else distinct
    base = [" ".join([f"n{c}"] + [str(w) for w in rng.choice(DEFAULT_WORDS, words - 1)]) for c in range(distinct)]
    return images, [base[i % distinct] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# counting passes


class PassCounter:
    """Rows through the UNet (no-grad / with a graph) and the VAE, charged to the attack running at the time."""

    def __init__(self, target: Any):
        self.label = CONTEXT
        self.rows: Dict[str, Dict[str, int]] = {}
        self.spans: Dict[str, List[float]] = {}   # label -> [start, end] perf_counter
        unet, vae = target.unet, target.vae
        self._wrap(unet, "forward", lambda a, k: a[0] if a else k["sample"],
                   lambda: "unet_grad" if torch.is_grad_enabled() else "unet_nograd")
        if vae is not None:
            self._wrap(vae, "encode", lambda a, k: a[0] if a else k["x"], lambda: "encode")
            self._wrap(vae, "decode", lambda a, k: a[0] if a else k["z"], lambda: "decode")

    def _wrap(self, module: Any, method: str, first: Callable, kind: Callable[[], str]) -> None:
        orig = getattr(module, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            slot = self.rows.setdefault(self.label, dict.fromkeys(KINDS, 0))
            slot[kind()] += int(first(args, kwargs).shape[0])
            return orig(*args, **kwargs)

        setattr(module, method, counted)

    @contextlib.contextmanager
    def charge(self, label: str) -> Iterator[None]:
        prev, self.label = self.label, label
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans[label] = [start, time.perf_counter()]
            self.label = prev

    def wrap_attacks(self, attacks: Sequence[Any]) -> None:
        """Charge every pass an attack's ``run`` makes to that attack."""
        for a in attacks:
            orig = a.run

            def run(ctx, cal_index, cal_labels, _orig=orig, _name=a.name):
                with self.charge(_name):
                    return _orig(ctx, cal_index, cal_labels)

            a.run = run


def counted_audit(target: Any, images: torch.Tensor, captions: List[str], attacks: Sequence[Any],
                  config: Dict[str, Any], threads: int) -> Dict[str, Any]:
    """A real ``run_audit`` of ``attacks`` with every pass counted; rows, seconds per label, the engine's count."""
    from smplora_plugin.audit import AuditSamples, run_audit

    n = images.shape[0]
    counter = PassCounter(target)
    counter.wrap_attacks(attacks)
    half = n // 2
    start = time.perf_counter()
    report = run_audit(target, AuditSamples(images[:half], captions[:half]),
                       AuditSamples(images[half:], captions[half:]), attacks=list(attacks), config=config,
                       progress=False, load_plugins=False, num_threads=threads)
    end = time.perf_counter()
    spans = counter.spans
    first = min(s[0] for s in spans.values())
    last = max(s[1] for s in spans.values())
    seconds = {name: s[1] - s[0] for name, s in spans.items()}
    seconds[CONTEXT] = first - start
    seconds[VERDICT] = end - last
    rows = {label: counter.rows.get(label, dict.fromkeys(KINDS, 0)) for label in [CONTEXT] + [a.name for a in attacks]}
    return {"samples": n, "distinct_captions": len(set(captions)), "rows": rows, "seconds": seconds,
            "wall_s": end - start, "engine_passes_per_sample": {k: v / n for k, v in report.passes.items()},
            "verdict": report.verdict["verdict"]}


def suite(target: Any, names: Optional[Sequence[str]] = None, options: Optional[Dict[str, Dict[str, Any]]] = None):
    """Attack instances: the default suite (``names=None``) or ``names``; ``options`` per attack name."""
    from smplora_plugin.audit.attacks import resolve_attacks
    from smplora_plugin.audit.attacks.registry import available_attacks

    chosen = resolve_attacks(None if names is None else list(names), True, load_plugins=False, target=target)
    registry = available_attacks(load_plugins=False)
    return [registry[a.name](**options[a.name]) if options and a.name in options else a for a in chosen]


def phase_count(args) -> Dict[str, Any]:
    target, side = build_target(True)
    n = 2 * args.samples
    images, captions = make_samples(n, side, args.caption_words, distinct=args.distinct_captions or None,
                                    seed=args.seed)
    cfg = {"batch_size": args.batch, "seed": args.seed, **args.config}
    full = counted_audit(target, images, captions, suite(target), cfg, args.threads)
    target, side = build_target(True)
    fast = counted_audit(target, images, captions, suite(target, args.fast), cfg, args.threads)
    return {"phase": "count", "caption_words": args.caption_words, "batch": args.batch, "full": full, "fast": fast,
            "fast_attacks": list(args.fast)}


# ---------------------------------------------------------------------------------------------
# timing passes at SD1.5 size


def measured(fn: Callable[[], Any]) -> Tuple[float, float]:
    """``(seconds, peak resident MiB)`` of ``fn()``, the high-water mark reset just before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    fn()
    s = time.perf_counter() - t0
    return s, max(status_kib("VmHWM"), status_kib("VmRSS")) / 1024


def phase_time(args, target: Any, side: int) -> Dict[str, Any]:
    """Per-operation seconds and peak memory of the audit's model calls at the target's size."""
    from smplora_plugin.audit.engine import cpu_settings

    with cpu_settings(args.threads):   # the audit's settings: its thread count, denormals flushed
        return _phase_time(args, target, side)


def _phase_time(args, target: Any, side: int) -> Dict[str, Any]:
    from smplora_plugin.audit.attacks.gsa import gradient_norms
    from smplora_plugin.audit.engine import AuditConfig, ScoreContext

    b = args.batch
    images, captions = make_samples(b, side, args.caption_words, seed=args.seed + 1)
    with torch.no_grad():
        z = target.encode(images[:1])
    zb = z.expand(b, *z.shape[1:]).clone()
    t1, tb = torch.full((1,), 300), torch.full((b,), 300)
    ops: Dict[str, List[Tuple[float, float]]] = {}

    def op(name: str, rows: int, fn: Callable[[], Any]) -> None:
        s, peak = measured(fn)
        ops.setdefault(name, []).append((s, peak))
        print(f"time {name} (rows {rows}): {s:.2f} s, peak {peak:.0f} MiB", file=sys.stderr, flush=True)

    cond1, condb = target.condition(captions[:1]), target.condition(captions[:b])
    for _ in range(args.repeats):   # batch-1 operations interleaved
        op("encode b1", 1, lambda: target.encode(images[:1]))
        op("eps b1", 1, lambda: target.eps(z, t1, cond1, adapter=True))
        op("eps b1 base", 1, lambda: target.eps(z, t1, cond1, adapter=False))
    op(f"eps b{b}", b, lambda: target.eps(zb, tb, condb, adapter=True))

    def gsa_one() -> None:
        ctx = ScoreContext(target, images[:1], captions[:1], AuditConfig(batch_size=1), progress=False)
        gradient_norms(ctx, args.gsa_timesteps)

    pairs = len(args.gsa_timesteps)
    s_enc, _ = measured(lambda: target.encode(images[:1]))
    s, peak = measured(gsa_one)
    gsa = f"gsa sample ({pairs} pair{'s' if pairs > 1 else ''})"
    ops.setdefault(gsa, []).append((s - s_enc, peak))   # its 1-image encode is counted as encode
    print(f"time {gsa}: {s - s_enc:.2f} s, peak {peak:.0f} MiB", file=sys.stderr, flush=True)
    op("decode b2", 2, lambda: target.decode(zb[:2]))
    med = {k: statistics.median(s for s, _ in v) for k, v in ops.items()}
    per_row = {"unet_nograd": med[f"eps b{b}"] / b, "unet_grad": med[gsa] / pairs,
               "encode": med["encode b1"], "decode": med["decode b2"] / 2}
    return {"phase": "time", "batch": b, "side": side, "gsa_pairs": pairs,
            "ops": {k: {"seconds": [s for s, _ in v], "peak_mib": max(p for _, p in v)} for k, v in ops.items()},
            "per_row_s": per_row, "threads": torch.get_num_threads(), "load": os.getloadavg()}


def phase_validate(args, target: Any, side: int, per_row: Dict[str, float]) -> Dict[str, Any]:
    """A real audit of 16 samples at the target's size, every default attack at the reduced setting; each
    attack's counted rows x ``per_row`` seconds against its measured seconds."""
    images, captions = make_samples(16, side, args.caption_words, distinct=VALIDATE_CAPTIONS, seed=args.seed + 2)
    attacks = suite(target, options={"gsa": dict(VALIDATE_GSA), "generation": dict(VALIDATE_GENERATION)})
    cfg = {**VALIDATE_CONFIG, "batch_size": args.batch, "seed": args.seed, **args.config}
    res = counted_audit(target, images, captions, attacks, cfg, args.threads)
    res["predicted_s"] = {label: sum(r[k] * per_row[k] for k in KINDS) for label, r in res["rows"].items()}
    return {"phase": "validate", "config": cfg, "gsa": VALIDATE_GSA, "generation": VALIDATE_GENERATION,
            "side": side, "per_row_s": per_row, **res, "load": os.getloadavg()}


# ---------------------------------------------------------------------------------------------
# the frontier's envelope under a subset


def frontier_coverage(subset: Sequence[str], path: Path = FRONTIER_ROWS) -> Optional[Dict[str, Any]]:
    """How much of each frontier row's upper envelope (max leakage ``max(AUC, 1 - AUC)`` over the default
    suite's model-using attacks; reference attacks left out) the ``subset`` keeps; ``None`` without rows."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    gaps, same, heads, heads_in = [], 0, 0, 0
    for r in rows:
        lk = {k: max(v, 1 - v) for k, v in r["per_attack_auc"].items()
              if v is not None and k not in REFERENCE_ATTACKS and k != "blind"}
        full, sub = max(lk.values()), max((lk[k] for k in subset if k in lk), default=0.5)
        gaps.append(full - sub)
        same += full - sub < 1e-12
        if r.get("headline_attack") not in REFERENCE_ATTACKS:
            heads += 1
            heads_in += r.get("headline_attack") in subset
    return {"rows": len(rows), "same_envelope": same, "max_gap": max(gaps), "mean_gap": float(np.mean(gaps)),
            "headlines": heads, "headlines_in_subset": heads_in}


# ---------------------------------------------------------------------------------------------
# tables


def _cost(rows: Dict[str, int], per_row: Dict[str, float]) -> float:
    return sum(rows[k] * per_row[k] for k in KINDS)


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.1f}" if seconds >= 360 else f"{seconds / 3600:.2f}"


def cost_table(count: Dict[str, Any], timing: Dict[str, Any], samples: int) -> str:
    """Per attack: passes per sample, extrapolated seconds per sample and hours for ``samples`` samples."""
    full, per_row = count["full"], timing["per_row_s"]
    n = full["samples"]
    lines = ["| attack (first to need a pass pays it) | UNet rows / sample (no grad) | UNet rows / sample with "
             "graph + backward | VAE encode / decode per sample | engine's count / sample | s / sample "
             f"(extrapolated) | hours for {samples // 2} + {samples // 2} | share | s on the tiny model (its "
             f"{n} samples) |",
             "|---|---|---|---|---|---|---|---|---|"]
    costs = {label: _cost(r, per_row) / n for label, r in full["rows"].items()}
    total = sum(costs.values())
    engine = full["engine_passes_per_sample"]
    for label, r in full["rows"].items():
        eng_txt = {"loss": f"{engine.get('loss', 0):g} (both grids)", "loss_calibrated": "(in loss)"}.get(
            label, f"{engine[label]:g}" if label in engine else "-")
        lines.append(f"| {label} | {r['unet_nograd'] / n:g} | {r['unet_grad'] / n:g} | {r['encode'] / n:g} / "
                     f"{r['decode'] / n:g} | {eng_txt} | {costs[label]:.1f} | {_h(costs[label] * samples)} | "
                     f"{costs[label] / total:.1%} | {full['seconds'].get(label, 0):.1f} |")
    tot = {k: sum(r[k] for r in full["rows"].values()) / n for k in KINDS}
    lines.append(f"| **total** | {tot['unet_nograd']:g} | {tot['unet_grad']:g} | {tot['encode']:g} / "
                 f"{tot['decode']:g} | | **{total:.0f}** | **{_h(total * samples)}** | 100% | {full['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def fast_table(count: Dict[str, Any], timing: Dict[str, Any], samples: int) -> str:
    fast, per_row = count["fast"], timing["per_row_s"]
    n = fast["samples"]
    per = sum(_cost(r, per_row) for r in fast["rows"].values()) / n
    full = sum(_cost(r, per_row) for r in count["full"]["rows"].values()) / count["full"]["samples"]
    rows_ = {k: sum(r[k] for r in fast["rows"].values()) / n for k in KINDS}
    cov = frontier_coverage(count["fast_attacks"])
    cov_txt = ("n/a (no benchmarks/frontier_rows.jsonl)" if cov is None else
               f"{cov['same_envelope']} / {cov['rows']} rows the same envelope (largest loss "
               f"{cov['max_gap']:.3f}); headline attack in the subset in {cov['headlines_in_subset']} / "
               f"{cov['headlines']} rows with a non-reference headline")
    return ("| subset | UNet rows / sample (no grad / graph) | VAE encode / decode per sample | s / sample "
            f"(extrapolated) | hours for {samples // 2} + {samples // 2} | vs full suite | frontier: envelope kept |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| `--fast`: {', '.join(count['fast_attacks'])} | {rows_['unet_nograd']:g} / {rows_['unet_grad']:g} | "
            f"{rows_['encode']:g} / {rows_['decode']:g} | {per:.1f} | {_h(per * samples)} | {per / full:.2f}x | "
            f"{cov_txt} |\n")


def timing_table(timing: Dict[str, Any]) -> str:
    pairs = timing.get("gsa_pairs", 4)
    gsa = f"gsa sample ({pairs} pair{'s' if pairs > 1 else ''})"
    rows = {"eps b1": 1, "eps b1 base": 1, "encode b1": 1, gsa: pairs, "decode b2": 2,
            f"eps b{timing['batch']}": timing["batch"]}
    lines = ["| operation (SD1.5 size, fp32) | rows | seconds (each run) | s / row | peak RSS (MiB) |",
             "|---|---|---|---|---|"]
    for name, v in timing["ops"].items():
        r = rows.get(name, 1)
        lines.append(f"| {name} | {r} | {', '.join(f'{s:.1f}' for s in v['seconds'])} | "
                     f"{statistics.median(v['seconds']) / r:.2f} | {v['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def validate_table(val: Dict[str, Any]) -> str:
    lines = ["| attack | UNet rows (no grad / graph) | VAE encode / decode | predicted s | measured s | "
             "measured / predicted |", "|---|---|---|---|---|---|"]
    labels = list(val["rows"]) + [VERDICT]
    pred_total = meas_total = 0.0
    for label in labels:
        r = val["rows"].get(label, dict.fromkeys(KINDS, 0))
        p, m = val["predicted_s"].get(label, 0.0), val["seconds"][label]
        pred_total, meas_total = pred_total + p, meas_total + m
        ratio = f"{m / p:.2f}" if p > 0 else "-"
        lines.append(f"| {label} | {r['unet_nograd']} / {r['unet_grad']} | {r['encode']} / {r['decode']} | "
                     f"{p:.1f} | {m:.1f} | {ratio} |")
    lines.append(f"| **total** | | | **{pred_total:.0f}** | **{meas_total:.0f}** (wall {val['wall_s']:.0f}) | "
                 f"**{meas_total / pred_total:.2f}** |")
    return "\n".join(lines) + "\n"


def latest(path: Optional[str], phase: str, this_run: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if phase in this_run:
        return this_run[phase]
    if not path or not Path(path).is_file():
        return None
    found = [r for r in map(json.loads, Path(path).read_text().splitlines()) if r.get("phase") == phase]
    return found[-1] if found else None


def report(args, this_run: Dict[str, Dict[str, Any]]) -> str:
    count, timing, val = (latest(args.out, p, this_run) for p in ("count", "time", "validate"))
    if count is None or timing is None:
        raise SystemExit("report needs a count and a time row: run --phases count,time first (same --out).")
    n = count["full"]["samples"]
    pr = timing["per_row_s"]
    size = "the tiny pipeline (--quick)" if args.quick else (
        f"SD1.5 (UNet, VAE, CLIP text encoder; random init) at {timing['side']} px")
    text = [f"Passes counted on the tiny pipeline by the real default suite ({n // 2} + {n // 2} samples, "
            f"{count['full']['distinct_captions']} distinct captions of {count['caption_words']} words, batch "
            f"{count['batch']}, default `AuditConfig`); seconds per row measured at {size}, fp32, "
            f"{timing['threads']} torch thread(s), load average {'/'.join(f'{x:.1f}' for x in timing['load'])}: "
            f"no-grad UNet row {pr['unet_nograd']:.2f} s (batch {timing['batch']}, text encoder included), row with "
            f"graph + backward {pr['unet_grad']:.2f} s (GSA: 4 rows per sample; timed with "
            f"{timing.get('gsa_pairs', 4)} row(s) in one forward), VAE encode {pr['encode']:.2f} s, "
            f"decode {pr['decode']:.2f} s per image. **Seconds per sample and hours are an extrapolation: counted "
            "passes x measured seconds per row.** The sklearn fits, bootstrap and permutations (no model) are "
            "not in it; the validation below measures them.\n", cost_table(count, timing, args.extrapolate),
            "\n`smplora audit --fast` (FAST_ATTACKS; counted by an audit of the subset alone, same samples):\n",
            fast_table(count, timing, args.extrapolate), "\nSeconds per operation at SD1.5 size:\n",
            timing_table(timing)]
    if val is not None:
        text += [f"\nValidation: a real `run_audit` at {val['side']} px on 8 + 8 samples ({VALIDATE_CAPTIONS} "
                 f"distinct captions), every default attack at a reduced setting (`{json.dumps(val['config'])}`, "
                 f"GSA `{val['gsa']}`, generation `{val['generation']}`); predicted = its counted rows x the seconds "
                 f"per row above; load average at its end {'/'.join(f'{x:.1f}' for x in val['load'])}.\n",
                 validate_table(val)]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny pipeline for the timing too, 8 + 8 samples: seconds")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated: " + ", ".join(PHASES))
    p.add_argument("--samples", type=int, default=None, help="members (= non-members) counted (default 200; "
                   "--quick 8)")
    p.add_argument("--extrapolate", type=int, default=400, help="audited samples the report's hours are for "
                   "(default 200 + 200; per-sample counts do not depend on it)")
    p.add_argument("--caption-words", type=int, default=16, help="words per caption (CLiD ranks at most 16)")
    p.add_argument("--distinct-captions", type=int, default=0,
                   help="distinct captions among the counted samples (0: every caption different; generation "
                        "pays per distinct caption)")
    p.add_argument("--batch", type=int, default=16, help="the audit's batch size (smplora audit --batch-size: 16)")
    p.add_argument("--latent", type=int, default=64, help="latent side of the SD1.5 timing (64: 512 px)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each batch-1 operation")
    p.add_argument("--gsa-timesteps", default="100,200,300,400",
                   help="the (t, noise) pairs of the timed GSA sample (GSA's default: 4, one row each, in one "
                        "forward with a graph; fewer to bound the memory: the cost per row is what is used)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the audit's default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", metavar="JSON",
                   help="AuditConfig fields over the counted and validation audits' own (e.g. '{\"n_boot\": 50}'; "
                        "the count changes with timesteps, draws and attack options)")
    p.add_argument("--fast", default=",".join(FAST), help="the subset whose cost and frontier coverage is reported")
    p.add_argument("--out", default=None, help="append each phase's row here (JSON lines); report reads it")
    p.add_argument("--write", action="store_true", help="write the section into --results-file")
    p.add_argument("--results-file", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    bad = [x for x in phases if x not in PHASES]
    if bad:
        p.error(f"unknown phase(s) {bad}; choose from {', '.join(PHASES)}")
    if args.caption_words < 1 or args.batch < 1 or args.repeats < 1 or args.distinct_captions < 0:
        p.error("--caption-words, --batch and --repeats must be >= 1, --distinct-captions >= 0")
    args.samples = args.samples or (8 if args.quick else 200)
    if args.samples < 8:
        p.error("--samples must be >= 8 (4 per calibration / evaluation split)")
    args.fast = tuple(x for x in args.fast.split(",") if x)
    try:
        args.gsa_timesteps = tuple(int(x) for x in args.gsa_timesteps.split(",") if x)
    except ValueError:
        p.error("--gsa-timesteps: comma-separated whole timesteps, e.g. 100,200,300,400")
    if not args.gsa_timesteps:
        p.error("--gsa-timesteps needs at least one timestep")
    try:
        args.config = json.loads(args.config)
    except ValueError as exc:
        p.error(f"--config is not JSON ({exc})")
    if not isinstance(args.config, dict):
        p.error("--config must be a JSON object of AuditConfig fields")
    torch.set_num_threads(args.threads)
    this: Dict[str, Dict[str, Any]] = {}

    def keep(row: Dict[str, Any]) -> None:
        this[row["phase"]] = row
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}) + "\n")

    if "count" in phases:
        keep(phase_count(args))
    if "time" in phases or "validate" in phases:
        target, side = build_target(args.quick, args.latent, args.seed)
        if "time" in phases:
            keep(phase_time(args, target, side))
        if "validate" in phases:
            timing = latest(args.out, "time", this)
            if timing is None:
                p.error("validate needs the time phase's seconds per row: run it in the same call or --out")
            keep(phase_validate(args, target, side, timing["per_row_s"]))
    if "report" in phases:
        text = report(args, this)
        print(text)
        if args.write:
            write_section(SECTION, "## Audit cost at SD1.5 scale (issue 27)\n\n" + header() + "\n" + text,
                          Path(args.results_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
