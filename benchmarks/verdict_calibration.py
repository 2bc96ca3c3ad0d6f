"""Does the audit's verdict hold its false-alarm target, and does it catch a leaking LoRA? (issue 10)

Two measurements, both with the whole default attack suite and the verdict of
``smplora_plugin.audit.verdict``:

- ``null``: a target with no membership signal (``MemorizingTarget(strength=0)``: the adapted
  model equals the base model) on i.i.d. synthetic images, one fresh draw of images and audit
  seed per run. Reported: how often the verdict says "leaks" (target <= 5%, bound 7.5%), the
  KS distance of the headline permutation p-values from uniform, and, for comparison, how often
  the old headline (the evaluation-split maximum AUC over attacks) left the chance band.
- ``demo``: the demo's digits (32 members drawn per seed, the demo's calibration / evaluation
  non-member pools), per seed a plain LoRA trained on the members and the untouched model
  (a zero LoRA that never trained: the base model), both audited. Done when the untouched model
  gets "no evidence" or "too few samples" in >= 18 of 20 seeds and plain LoRA "leaks" in 20 of 20.

Run (niced, one thread):
  nice -n 10 python -m benchmarks.verdict_calibration null --seeds 0-59 --write
  nice -n 10 python -m benchmarks.verdict_calibration demo --seeds 0-19 --write   (300 steps, 48 / 64 non-members)
  nice -n 10 python -m benchmarks.verdict_calibration fraction --batch-size 1 --steps 2400 --seeds 0-1 --write

``fraction`` (issue 12): untouched, plain, and the ``robust`` preset with the privacy term on every
step vs ``privacy_fraction=0.25`` taken over steps (at batch 1: one step in four carries the
term, the base forward and the attacker update), audited alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from ._common import header, write_section

ROWS = Path(__file__).with_name("verdict_calibration_rows.jsonl")


def _seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def null_run(seed: int, n_eval: int, n_cal: int, side: int = 8, toy: bool = False) -> Dict[str, Any]:
    """One audit of a target with no membership signal; returns the verdict's key numbers."""
    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.audit import metrics as M
    from smplora_plugin.audit.synthetic import MemorizingTarget, synthetic_pool

    n = 2 * (n_eval + n_cal)
    pool = synthetic_pool(n, (1, side, side), seed=1000 + seed)
    mem, non = pool[: n // 2], pool[n // 2:]
    cfg: Dict[str, Any] = {"seed": seed, "draws": 2, "n_boot": 200, "mlp_max_epochs": 40}
    if toy:
        cfg.update(draws=1, timesteps=[100, 300], mlp_max_epochs=5, n_boot=50)
    t0 = time.time()
    rep = run_audit(MemorizingTarget(mem, strength=0.0), AuditSamples(mem[n_cal:]), AuditSamples(non[n_cal:]),
                    calibration_members=AuditSamples(mem[:n_cal]), calibration_nonmembers=AuditSamples(non[:n_cal]),
                    config=cfg, progress=False, num_threads=1)
    v = rep.verdict
    lo, hi = M.null_band(n_eval, n_eval)
    return {"mode": "null", "seed": seed, "n_eval": n_eval, "n_cal": n_cal, "verdict": v["verdict"],
            "p_headline": v["p_values"]["headline"], "p_envelope": v["p_values"]["upper_envelope_auc"],
            "headline": v["headline"]["attack"], "headline_auc": v["headline"]["auc"],
            "max_auc": rep.max_over_attacks["auc"]["value"],
            "max_auc_above_band": rep.max_over_attacks["auc"]["value"] > hi,
            "blind_warning": any("blind" in w for w in v["warnings"]), "seconds": round(time.time() - t0, 1)}


#: ``fraction`` mode: the ``robust`` preset at one row per step (the old cost at batch 1) and with the
#: preset's privacy_fraction 0.25 taken over steps (one step in four at batch 1)
FRACTION_VARIANTS = {"untouched": None, "plain": None, "robust every step": 1.0, "robust f=0.25 over steps": 0.25}


def demo_run(seed: int, members: int, steps: int, n_cal: int = 48, n_eval: int = 64,
             toy: bool = False, variants=("untouched", "plain"), batch_size: int = 0,
             mode: str = "demo") -> List[Dict[str, Any]]:
    """Plain LoRA and the untouched model on the demo's digits, one member draw per seed (``variants`` may add
    ``FRACTION_VARIANTS``' robust rows; ``batch_size`` 0 keeps the demo's)."""
    from smplora_plugin import PrivacyConfig, PrivacyRegularizer
    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.demo.model import TinyLDM
    from smplora_plugin.demo.pipeline import DemoConfig, _member_halves, load_assets, train_assets
    from smplora_plugin.demo.target import TinyLDMTarget
    from smplora_plugin.demo.train import train_lora

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    cfg = DemoConfig(members=members, steps=steps, nonmember_calibration=n_cal, nonmember_eval=n_eval,
                     **({"batch_size": batch_size} if batch_size else {}))
    loaded = load_assets(cfg)
    base = (loaded if loaded is not None else train_assets(cfg, progress=False))[0]
    splits = cfg.data.splits({"member": cfg.members, "nonmember_defense": cfg.nonmember_defense,
                              "nonmember_calibration": cfg.nonmember_calibration,
                              "nonmember_eval": cfg.nonmember_eval}, seed)
    audit_cfg: Dict[str, Any] = {"seed": seed}
    if toy:
        audit_cfg.update(draws=1, timesteps=[100, 300], mlp_max_epochs=5, n_boot=50)
    m_cal, m_eval = _member_halves(splits["member"], seed)
    samples = lambda d: AuditSamples(d.images, d.captions, d.ids)  # noqa: E731
    rows = []
    for variant in variants:
        model = TinyLDM(cfg.data.model_config, seed=0)
        model.load_base_state_dict(base.base_state_dict())
        model.add_lora(cfg.lora_rank, seed=seed)
        t0 = time.time()
        if variant != "untouched":
            fraction = FRACTION_VARIANTS.get(variant)
            reg = None if fraction is None else PrivacyRegularizer(
                PrivacyConfig.preset("robust", privacy_fraction=fraction, seed=seed), load_entry_points=False)
            train_lora(model, splits["member"], steps=cfg.steps, lr=cfg.lora_lr, batch_size=cfg.batch_size, seed=seed,
                       reg=reg, nonmembers=splits["nonmember_defense"] if reg is not None else None, progress=False)
        t1 = time.time()
        rep = run_audit(TinyLDMTarget(model), samples(m_eval), samples(splits["nonmember_eval"]),
                        calibration_members=samples(m_cal),
                        calibration_nonmembers=samples(splits["nonmember_calibration"]),
                        config=audit_cfg, progress=False, num_threads=1)
        v = rep.verdict
        rows.append({"mode": mode, "variant": variant, "seed": seed, "members": members, "steps": steps,
                     "batch_size": cfg.batch_size,
                     "n_member_eval": len(m_eval), "n_nonmember_eval": len(splits["nonmember_eval"]),
                     "verdict": v["verdict"], "p_headline": v["p_values"]["headline"],
                     "p_envelope": v["p_values"]["upper_envelope_auc"], "headline": v["headline"]["attack"],
                     "headline_auc": v["headline"]["auc"], "max_auc": rep.max_over_attacks["auc"]["value"],
                     "smallest_detectable_auc": v["power"]["smallest_detectable_auc"],
                     "epsilon_lb": v["epsilon_lower_bound"]["epsilon"], "warnings": len(v["warnings"]),
                     "train_seconds": round(t1 - t0, 1), "audit_seconds": round(time.time() - t1, 1)})
    return rows


def summarise(rows: List[Dict[str, Any]], mode: str) -> str:
    from smplora_plugin.audit.stats import ks_uniform_distance

    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return f"(no {mode} rows)"
    if mode == "null":
        n = len(rows)
        leaks = sum(r["verdict"] == "leaks" for r in rows)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})}
        ks = ks_uniform_distance([r["p_headline"] for r in rows])
        sizes = sorted({(r["n_eval"], r["n_cal"]) for r in rows})
        return "\n".join([
            f"- runs: {n} seeds; evaluation / calibration per side: {', '.join(f'{a} / {b}' for a, b in sizes)}",
            f"- verdict counts: {json.dumps(counts)}",
            f"- **false-alarm rate ('leaks'): {leaks}/{n} = {100 * leaks / n:.1f}%** (target <= 5%, bound 7.5%)",
            f"- headline permutation p-values: KS distance from uniform {ks:.3f} (the 5% critical value for "
            f"n = {n} is about {1.36 / n ** 0.5:.3f}); p < 0.025 in {sum(r['p_headline'] < 0.025 for r in rows)}, "
            f"upper-envelope p < 0.025 in {sum(r['p_envelope'] < 0.025 for r in rows)}",
            f"- for comparison, the old headline (max AUC over attacks on the evaluation split) above the "
            f"single-attack chance band: {sum(r['max_auc_above_band'] for r in rows)}/{n}; mean max AUC "
            f"{sum(r['max_auc'] for r in rows) / n:.3f}",
        ])
    timed = mode == "fraction"   # the training time shows what the schedule saves (wall clock, machine shared)
    lines = ["| model | runs | leaks | no evidence | too few samples | headline AUC (mean) | max AUC (mean) | "
             "eps lower bound (mean) | smallest detectable AUC |" + (" training wall s (mean) |" if timed else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for variant in FRACTION_VARIANTS:
        rs = [r for r in rows if r["variant"] == variant]
        if not rs:
            continue
        c = lambda v, rs=rs: sum(r["verdict"] == v for r in rs)  # noqa: E731
        m = lambda k, rs=rs: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        lines.append(f"| {variant} | {len(rs)} | {c('leaks')} | {c('no evidence of leakage at this size')} | "
                     f"{c('too few samples to tell')} | {m('headline_auc'):.3f} | {m('max_auc'):.3f} | "
                     f"{m('epsilon_lb'):.2f} | {m('smallest_detectable_auc'):.3f} |"
                     + (f" {m('train_seconds'):.0f} |" if timed else ""))
    r0 = rows[0]
    lines.append("")
    lines.append(f"{r0['members']} members (evaluation {r0['n_member_eval']} members / {r0['n_nonmember_eval']} "
                 f"non-members), LoRA {r0['steps']} steps at batch {r0.get('batch_size', 32)}; the member draw, LoRA "
                 "init, batches and audit seed change with the seed.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["null", "demo", "fraction"],
                   help="fraction: as demo, plus the robust preset every step vs privacy_fraction 0.25 over steps")
    p.add_argument("--batch-size", type=int, default=0, help="demo / fraction: LoRA batch size (0: the demo's 32)")
    p.add_argument("--seeds", default="0-39", help="e.g. 0-39 or 0,1,2")
    p.add_argument("--n-eval", type=int, default=100, help="null: evaluation members (= non-members)")
    p.add_argument("--n-cal", type=int, default=50, help="null: calibration members (= non-members)")
    p.add_argument("--members", type=int, default=32, help="demo: members trained on (half evaluated)")
    p.add_argument("--steps", type=int, default=300, help="demo: plain LoRA steps (the demo's default is 600)")
    p.add_argument("--nonmember-calibration", type=int, default=48, help="demo: calibration non-members")
    p.add_argument("--nonmember-eval", type=int, default=64, help="demo: evaluation non-members")
    p.add_argument("--rows", default=str(ROWS), help="append each run here; seeds already there are skipped")
    p.add_argument("--write", action="store_true", help="write the summary into RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows_path = Path(args.rows)
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []

    def key(r):
        if r["mode"] == "null":
            return ("null", r["seed"], r["n_eval"], r["n_cal"])
        return (r["mode"], r["seed"], r["members"], r["steps"], r["n_nonmember_eval"], r.get("batch_size", 32))

    done = {key(r) for r in rows}
    batch = args.batch_size or 32
    variants = tuple(FRACTION_VARIANTS) if args.mode == "fraction" else ("untouched", "plain")
    for s in _seeds(args.seeds):
        k = ("null", s, args.n_eval, args.n_cal) if args.mode == "null" else (args.mode, s, args.members, args.steps,
                                                                               args.nonmember_eval, batch)
        if k in done:
            continue
        new = [null_run(s, args.n_eval, args.n_cal)] if args.mode == "null" else demo_run(
            s, args.members, args.steps, args.nonmember_calibration, args.nonmember_eval, variants=variants,
            batch_size=args.batch_size, mode=args.mode)
        with rows_path.open("a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")
        rows += new
        for r in new:
            print(f"{args.mode} seed {s} {r.get('variant', '')}: {r['verdict']} (p_head {r['p_headline']:.3g}, "
                  f"p_env {r['p_envelope']:.3g}, headline {r['headline']} {r['headline_auc']:.3f})", flush=True)
    if args.mode == "null":
        sel = [r for r in rows if r["mode"] == "null" and r["n_eval"] == args.n_eval and r["n_cal"] == args.n_cal]
    else:
        sel = [r for r in rows if r["mode"] == args.mode and r["members"] == args.members and r["steps"] == args.steps
               and r["n_nonmember_eval"] == args.nonmember_eval and r.get("batch_size", 32) == batch]
    text = summarise(sel, args.mode)
    print(text)
    if args.write:
        title = ("Privacy fraction over steps at batch 1: the verdict (issue 12)" if args.mode == "fraction"
                 else f"Verdict calibration: {args.mode}")
        write_section(f"verdict_{args.mode}", f"## {title}\n\n{header()}\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
