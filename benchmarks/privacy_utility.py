"""Privacy-utility frontier of SMP-LoRA against rival defenses (issue 5, part 2).

On the demo's tiny latent diffusion model (digits; shipped base weights), the same members and
the same step budget, every defense is trained and audited with the audit suite:

- plain LoRA at several step counts (early stopping, the cheapest defense);
- SMP-LoRA with the paper's features (the demo's setting) and the ``robust`` preset (base-
  calibrated features) at several alphas; MP-LoRA;
- DP-SGD on the LoRA parameters: per-sample gradients with Opacus' GradSampleModule, flat
  clipping, Gaussian noise; epsilon from Opacus' RDP accountant at delta = 1e-5 (assuming
  Poisson sampling at rate batch/members, the standard approximation for shuffled batches);
- a RelaxLoss-style loss floor: gradient ascent whenever the member batch loss falls below the
  running non-member loss level.

Utility: held-out denoising loss (the audit's fixed draws) as a ratio to plain LoRA at the full
step count, and the digit classifier's accuracy on generated samples. Privacy: max-attack AUC
and max-attack TPR@1%FPR over the attacks run. Each seed re-draws LoRA init, batches, noise and
the audit's draws; the member / non-member split is fixed.

Run (from the repository root):  python -m benchmarks.privacy_utility --seeds 0,1,2 --jobs 2 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from smplora_plugin.dp.errors import DPError

from ._common import header, run_in_workers, write_section

OUT = Path(__file__).with_name("privacy_utility.png")
# name -> (kind, parameters)
CONFIGS: Dict[str, Dict[str, Any]] = {
    "null: untrained LoRA (base model)": dict(kind="plain", steps=0),
    "plain@150": dict(kind="plain", steps=150),
    "plain@300": dict(kind="plain", steps=300),
    "plain": dict(kind="plain"),
    "smp-paper-features a10 k5": dict(kind="smp", alpha=10.0, k_steps=5, attacker_lr=1e-3),
    "smp-robust a5": dict(kind="robust", alpha=5.0, privacy_fraction=1.0),
    "smp-robust a20": dict(kind="robust", alpha=20.0, privacy_fraction=1.0),
    "smp-robust a50": dict(kind="robust", alpha=50.0, privacy_fraction=1.0),
    "smp-robust a20 every-step": dict(kind="robust", alpha=20.0, nonmember_every=1, privacy_fraction=1.0),
    "smp-robust a5 quarter-batch": dict(kind="robust", alpha=5.0, privacy_fraction=0.25),
    "smp-robust a20 quarter-batch": dict(kind="robust", alpha=20.0, privacy_fraction=0.25),
    "smp-robust a20 1200 steps": dict(kind="robust", alpha=20.0, privacy_fraction=1.0, steps=1200),
    "smp-robust a20 quarter-batch 1200 steps": dict(kind="robust", alpha=20.0, privacy_fraction=0.25, steps=1200),
    # the pooling grid (issue 12): textures' 8x8 latents pooled to 4x4 cells of 2x2 and 2x2 cells of 4x4, the
    # pooling factors of feature_grid 32 and 16 on SD1.5's 64x64 latents (the rows above use the identity grid)
    "smp-robust a20 quarter-batch grid/2": dict(kind="robust", alpha=20.0, privacy_fraction=0.25, grid_div=2),
    "smp-robust a20 quarter-batch grid/4": dict(kind="robust", alpha=20.0, privacy_fraction=0.25, grid_div=4),
    "mp a0.05": dict(kind="mp", alpha=0.05, attacker_lr=1e-3),
    "dp-sgd s0.25": dict(kind="dpsgd", noise=0.25, clip=0.05),
    "dp-sgd s0.5": dict(kind="dpsgd", noise=0.5, clip=0.05),
    "dp-sgd s1": dict(kind="dpsgd", noise=1.0, clip=0.05),
    "dp-sgd s2": dict(kind="dpsgd", noise=2.0, clip=0.05),
    "dp-sgd s4": dict(kind="dpsgd", noise=4.0, clip=0.05),
    "loss-floor": dict(kind="floor"),
}
ATTACKS = ["loss", "loss_calibrated", "loss_best_t", "sima", "secmi", "pia", "clid", "logreg", "gboost"]


def _setup(dataset: str):
    from smplora_plugin.demo.pipeline import DemoConfig, load_assets, train_assets

    cfg = DemoConfig(dataset=dataset)
    loaded = load_assets(cfg)
    base, clf = loaded if loaded is not None else train_assets(cfg, progress=False)
    splits = cfg.data.splits({"member": cfg.members, "nonmember_defense": cfg.nonmember_defense,
                              "nonmember_calibration": cfg.nonmember_calibration,
                              "nonmember_eval": cfg.nonmember_eval}, 0)
    return cfg, base, clf, splits


def _model(base, cfg, seed):
    from smplora_plugin.demo.model import TinyLDM

    model = TinyLDM(cfg.data.model_config, seed=0)
    model.load_base_state_dict(base.base_state_dict())
    model.add_lora(cfg.lora_rank, seed=seed)
    return model


def _batches(model, data, steps, bs, seed):
    """Yield (z_t, t, cond, noise) member batches exactly as the demo's train_lora draws them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z, c = model.encode(data.images), model.text(data.captions)
    T = model.cfg.num_train_timesteps
    bs = min(bs, len(data))
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=g)[:bs]
        noise = torch.randn(z[idx].shape, generator=g)
        t = torch.randint(0, T, (bs,), generator=g)
        yield model.add_noise(z[idx], t, noise), t, c[idx], noise


def _dp_batches(model, data, steps, bs, seed, noise_mult: int = 1, flip: bool = False):
    """Yield ``(z_t, t, cond, noise)`` batches of ``bs`` members, each member repeated ``noise_mult`` times in a row
    (its own noise and timestep per copy; with ``flip`` each copy is mirrored with probability 1/2, the coins from
    their own generator as in the demo's ``train_lora``). ``noise_mult=1`` without ``flip`` draws exactly
    :func:`_batches`' batches."""
    g = torch.Generator().manual_seed(seed)
    g_flip = torch.Generator().manual_seed(seed + 104_729)
    with torch.no_grad():
        z, c = model.encode(data.images), model.text(data.captions)
        z_mirror = model.encode(data.images.flip(-1)) if flip else None
    T = model.cfg.num_train_timesteps
    bs = min(bs, len(data))
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=g)[:bs]
        rows = idx if noise_mult == 1 else idx.repeat_interleave(noise_mult)
        z0 = z[rows]
        if z_mirror is not None:
            z0 = torch.where((torch.rand(len(rows), generator=g_flip) < 0.5).view(-1, 1, 1, 1), z_mirror[rows], z0)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, T, (len(rows),), generator=g)
        yield model.add_noise(z0, t, noise), t, c[rows], noise


def _check_dp(noise: Any, clip: Any, noise_mult: Any) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise DPError(f"noise={noise!r}: the noise multiplier sigma is a number >= 0 (0: clipping alone, no DP).")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0:
        raise DPError(f"clip={clip!r}: the per-sample clip C is a number > 0, e.g. 0.05 or 1.0.")
    if isinstance(noise_mult, bool) or not isinstance(noise_mult, int) or noise_mult < 1:
        raise DPError(f"noise_mult={noise_mult!r}: the noise / timestep draws per member are a whole number >= 1.")


def train_dpsgd(model, members, *, steps, lr, bs, seed, noise, clip, noise_mult: int = 1,
                flip: bool = False) -> Optional[float]:
    """DP-SGD on the LoRA parameters (per-sample clipping + Gaussian noise); returns epsilon at delta 1e-5.

    ``noise=0`` is per-sample clipping alone: no guarantee, so the epsilon is ``None``. ``noise_mult`` ``K``
    (DPDM's noise multiplicity): each member's gradient is that of the mean of its loss over ``K`` noise /
    timestep draws, averaged before clipping, so it costs no privacy (the same epsilon) and ``K`` times the
    compute. ``flip``: augmentation (each draw mirrored with probability 1/2), also inside the clipped
    per-member gradient; with ``K >= 2`` it is augmentation multiplicity. ``K = 1`` without ``flip`` is the
    original path, draw for draw.
    """
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant

    _check_dp(noise, clip, noise_mult)
    gsm = GradSampleModule(model.unet)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g_noise = torch.Generator().manual_seed(seed + 1234)
    acc = RDPAccountant()
    q = min(bs, len(members)) / len(members)
    k = noise_mult
    for z_t, t, cond, eps in _dp_batches(model, members, steps, bs, seed, k, flip):
        pred = gsm(z_t, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, eps, reduction="none").mean((1, 2, 3))
        n = len(z_t) // k  # members in the batch
        opt.zero_grad(set_to_none=True)
        (per_sample.sum() if k == 1 else per_sample.view(n, k).mean(1).sum()).backward()
        # each member's gradient: the sum of its K rows' gradients (each of its loss / K)
        member = [p.grad_sample if k == 1 else p.grad_sample.reshape(n, k, *p.shape).sum(1) for p in params]
        norms = torch.cat([gm.reshape(n, -1) for gm in member], 1).norm(dim=1)
        factor = (clip / (norms + 1e-12)).clamp(max=1.0)
        for p, gm in zip(params, member):
            clipped = (gm * factor.view(-1, *[1] * (gm.ndim - 1))).sum(0)
            p.grad = (clipped + torch.randn(p.shape, generator=g_noise) * noise * clip) / n
            p.grad_sample = None
        opt.step()
        if noise > 0:
            acc.step(noise_multiplier=noise, sample_rate=q)
    gsm._close()
    model.unet = gsm._module
    return float(acc.get_epsilon(delta=1e-5)) if noise > 0 else None


def train_smp_dp(model, members, nonmembers, *, steps, lr, bs, seed, noise, clip, reg,
                 flip: bool = False) -> Tuple[float, float]:
    """SMP-LoRA under DP noise, with the core's DP-SGD (:class:`smplora_plugin.dp.DPTraining`).

    The member batches, timesteps, noise, flip coins and non-member draws are the demo's ``train_lora``'s for
    the same seed. Each step: the attacker update and each member's own SMP term
    (:meth:`~smplora_plugin.PrivacyRegularizer.step_per_sample`: every row is a privacy row), one backward whose
    per-sample gradients the hooks on the LoRA layers capture, then clipping to ``clip``, noise ``sigma = noise``
    once per step, division by the batch. Returns ``(epsilon at delta 1e-5, mean adaptation loss of the last
    100 steps)``; the epsilon is the RDP accountant's at ``q = batch / members`` (the batches are fixed-size random
    subsets: the Poisson figure is an approximation, as for :func:`train_dpsgd`) and does not cover the proxy
    attacker, which is fit on member features outside the mechanism.
    """
    from smplora_plugin.dp import DPTraining, dp_options

    _check_dp(noise, clip, 1)
    if noise <= 0:
        raise DPError("smp_dp needs noise > 0 (SMP-LoRA with clipping alone is not a DP row).")
    if nonmembers is None:
        raise DPError("smp_dp needs the defense's non-members (the proxy attacker's held-out batches).")
    g = torch.Generator().manual_seed(seed)
    g_nm = torch.Generator().manual_seed(seed + 7919)
    g_flip = torch.Generator().manual_seed(seed + 104_729)
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bs = min(bs, len(members))
    options = dp_options("smplora", noise_multiplier=float(noise), max_grad_norm=float(clip), delta=1e-5,
                         seed=seed + 1234)
    dpt = DPTraining(model.unet, options, dataset_size=len(members), batch_size=bs, planned_steps=steps,
                     regularizer=reg)
    with torch.no_grad():
        z_m, c_m = model.encode(members.images), model.text(members.captions)
        z_mirror = model.encode(members.images.flip(-1)) if flip else None
        z_n, c_n = model.encode(nonmembers.images), model.text(nonmembers.captions)
    T = model.cfg.num_train_timesteps
    nb = reg.nonmember_rows(bs)
    losses: List[float] = []

    def base(z_t, t, cond):
        if not reg.config.calibrated:
            return None
        with torch.no_grad(), model.adapter(False):
            return model.predict(z_t, t, cond)

    dpt.attach(opt)
    model.unet.train()
    try:
        for _ in range(steps):
            idx = torch.randperm(len(members), generator=g)[:bs]
            z0 = z_m[idx]
            if z_mirror is not None:
                z0 = torch.where((torch.rand(bs, generator=g_flip) < 0.5).view(-1, 1, 1, 1), z_mirror[idx], z0)
            noise_ = torch.randn(z0.shape, generator=g)
            t = torch.randint(0, T, (bs,), generator=g)
            z_t = model.add_noise(z0, t, noise_)
            pred = model.predict(z_t, t, c_m[idx])
            per_sample = F.mse_loss(pred, noise_, reduction="none").mean((1, 2, 3))
            losses.append(float(per_sample.detach().mean()))
            member_feats = reg.features(pred, noise_, t, reference=base(z_t, t, c_m[idx]))
            nonmember_feats = None
            if reg.wants_nonmembers():
                j = torch.randperm(len(nonmembers), generator=g_nm)[:nb]
                noise_n = torch.randn(z_n[j].shape, generator=g_nm)
                t_n = torch.randint(0, T, (len(j),), generator=g_nm)
                z_tn = model.add_noise(z_n[j], t_n, noise_n)
                with torch.no_grad():
                    pred_n = model.predict(z_tn, t_n, c_n[j])
                nonmember_feats = reg.features(pred_n, noise_n, t_n, reference=base(z_tn, t_n, c_n[j]))
            objective = reg.step_per_sample(per_sample, member_feats, nonmember_feats)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()  # DPTraining's pre-hook: the per-sample gradients, clipped, summed, noised, / batch
    finally:
        dpt.detach()
        model.eval()
    tail = losses[-100:]
    return float(dpt.epsilon()), sum(tail) / max(1, len(tail))


def train_floor(model, members, nonmembers, *, steps, lr, bs, seed, momentum=0.9) -> None:
    """RelaxLoss-style: descend above the running non-member loss level, ascend below it."""
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    nm = _batches(model, nonmembers, steps, bs, seed + 7919)
    floor: Optional[float] = None
    for z_t, t, cond, eps in _batches(model, members, steps, bs, seed):
        with torch.no_grad():
            zn, tn, cn, en = next(nm)
            level = F.mse_loss(model.predict(zn, tn, cn), en).item()
        floor = level if floor is None else momentum * floor + (1 - momentum) * level
        loss = F.mse_loss(model.predict(z_t, t, cond), eps)
        objective = loss if loss.item() >= floor else -loss
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()


def run_one(name: str, seed: int, steps_full: Optional[int] = None, toy: bool = False,
            dataset: str = "digits") -> Dict[str, Any]:
    """Train and audit one defense on ``dataset``; ``toy`` shrinks everything for the smoke test."""
    from smplora_plugin import PrivacyConfig, PrivacyRegularizer
    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.demo.data import DigitSet
    from smplora_plugin.demo.pipeline import _member_halves
    from smplora_plugin.demo.quality import sample_quality
    from smplora_plugin.demo.target import TinyLDMTarget
    from smplora_plugin.demo.train import train_lora

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    cfg, base, clf, splits = _setup(dataset)
    spec = dict(CONFIGS[name])
    kind = spec.pop("kind")
    steps = spec.pop("steps", steps_full or cfg.steps)
    attacks, per_label, audit_cfg = ATTACKS, cfg.samples_per_label, {"seed": seed, "n_boot": 200}
    if toy:
        steps, attacks, per_label = 3, ["loss", "loss_calibrated"], 2
        audit_cfg.update(draws=1, timesteps=[100, 300])
    model = _model(base, cfg, seed)
    members, nonmembers = splits["member"], splits["nonmember_defense"]
    lat = cfg.data.model_config.latent_size // spec.pop("grid_div", 1)
    t0 = time.time()
    epsilon = None
    if kind == "dpsgd":
        epsilon = train_dpsgd(model, members, steps=steps, lr=cfg.lora_lr, bs=cfg.batch_size, seed=seed, **spec)
    elif kind == "floor":
        train_floor(model, members, nonmembers, steps=steps, lr=cfg.lora_lr, bs=cfg.batch_size, seed=seed)
    else:
        reg = None
        if kind == "robust":
            reg = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=lat, seed=seed, **spec),
                                     load_entry_points=False)
        elif kind in ("smp", "mp"):
            reg = PrivacyRegularizer(objective=kind, feature_grid=lat, seed=seed, load_entry_points=False, **spec)
        train_lora(model, members, steps=steps, lr=cfg.lora_lr, batch_size=cfg.batch_size, seed=seed, reg=reg,
                   nonmembers=nonmembers, name=name, progress=False)
    train_s = time.time() - t0
    m_cal, m_eval = _member_halves(members, 0)
    samples = lambda d: AuditSamples(d.images, d.captions, d.ids)  # noqa: E731
    report = run_audit(TinyLDMTarget(model), samples(m_eval), samples(splits["nonmember_eval"]),
                       calibration_members=samples(m_cal),
                       calibration_nonmembers=samples(splits["nonmember_calibration"]),
                       attacks=attacks, config=audit_cfg, progress=False, num_threads=1)
    reference = DigitSet.concat(splits["nonmember_calibration"], splits["nonmember_eval"])
    quality = sample_quality(model, clf, reference, per_label=per_label, steps=cfg.sample_steps, seed=seed,
                             captioner=cfg.data.captioner)
    mx = report.max_over_attacks
    return {"dataset": dataset, "config": name, "seed": seed, "steps": steps, "epsilon": epsilon,
            "train_seconds": round(train_s, 1),
            "max_auc": mx["auc"]["value"], "max_auc_attack": mx["auc"]["attack"],
            "max_tpr_1pct": mx.get("tpr_at_1pct_fpr", {}).get("value"),
            "heldout_loss": report.utility["heldout_denoising_loss"],
            "classifier_accuracy": quality["classifier_accuracy"], "frechet_distance": quality["frechet_distance"],
            "per_attack_auc": {k: v["auc"] for k, v in report.attacks.items()}}


def _mean_sd(xs: List[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _dataset(r: Dict[str, Any]) -> str:
    return r.get("dataset", "digits")  # rows written before the textures data set have no field


def table(rows: List[Dict[str, Any]]) -> str:
    """One Markdown table (mean ± sd over seeds) for the rows of one data set."""
    plain = {r["seed"]: r["heldout_loss"] for r in rows if r["config"] == "plain"}
    lines = ["| defense | seeds | max-attack AUC | max TPR@1%FPR | held-out loss / plain | classifier acc. | "
             "Fréchet dist. | epsilon (δ=1e-5) | strongest attack |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        rs = [r for r in rows if r["config"] == name]
        if not rs:
            continue
        ratio = [r["heldout_loss"] / plain[r["seed"]] for r in rs if r["seed"] in plain]
        attacks = sorted({r["max_auc_attack"] for r in rs})
        eps = _mean_sd([r["epsilon"] for r in rs]) if rs[0]["epsilon"] is not None else "—"
        lines.append(f"| {name} | {len(rs)} | {_mean_sd([r['max_auc'] for r in rs])} | "
                     f"{_mean_sd([r['max_tpr_1pct'] for r in rs])} | {_mean_sd(ratio)} | "
                     f"{_mean_sd([r['classifier_accuracy'] for r in rs])} | "
                     f"{_mean_sd([r['frechet_distance'] for r in rs])} | "
                     f"{eps} | {', '.join(attacks)} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    """One PNG: a row of (AUC, TPR@1%FPR) against classifier accuracy per data set; one point per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(_dataset(r) == d for r in rows)]
    fig, grid = plt.subplots(len(datasets), 2, figsize=(11, 4.5 * len(datasets)), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for axes, ds in zip(grid, datasets):
        for i, name in enumerate(CONFIGS):
            rs = [r for r in rows if r["config"] == name and _dataset(r) == ds]
            if not rs:
                continue
            x = [r["classifier_accuracy"] for r in rs]
            for ax, key in zip(axes, ("max_auc", "max_tpr_1pct")):
                ys = [r[key] if r[key] is not None else float("nan") for r in rs]
                ax.scatter(x, ys, label=name, s=28, color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                           marker="os^Dv<>pPX*h"[i % 12])
        axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[0].set_ylabel(f"{ds}: max-attack AUC (lower = more private)")
        axes[1].set_ylabel(f"{ds}: max-attack TPR at 1% FPR")
        for ax in axes:
            ax.set_xlabel(f"{ds}: classifier accuracy on generated samples (higher = more useful)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6, loc="best")
    fig.suptitle("Privacy-utility frontier, tiny LDM (one point per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


DATASETS = ("digits", "textures")
SECTION = {"digits": ("privacy_utility", "digits"), "textures": ("privacy_utility_textures", "procedural textures")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits (the demo's) or textures (16x16 procedurally generated textured shapes)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    p.add_argument("--nice", type=int, default=0, help="niceness added to every worker")
    p.add_argument("--rows", default=str(Path(__file__).with_name("privacy_utility_rows.jsonl")),
                   help="append each finished run here; runs already there are skipped")
    p.add_argument("--write", action="store_true", help="write the table into RESULTS.md and the PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: use 1 or more")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}")
    rows_path = Path(args.rows)
    done = set()
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done.add((_dataset(r), r["config"], r["seed"]))
    todo = [(c, int(s), None, False, args.dataset) for s in args.seeds.split(",") for c in configs
            if (args.dataset, c, int(s)) not in done]
    for (c, s, *_), r, error in run_in_workers(run_one, todo, jobs=args.jobs, nice=args.nice):
        if error is not None:
            print(f"FAILED {(c, s)}: {error!r}{error.__cause__ or ''}", file=sys.stderr)
            continue
        with rows_path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{r['config']:<28} seed {r['seed']}: max AUC {r['max_auc']:.3f} ({r['max_auc_attack']}), "
              f"held-out {r['heldout_loss']:.4f}, clf acc {r['classifier_accuracy']:.3f}", flush=True)
    all_rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    rows = [r for r in all_rows if r["config"] in configs and _dataset(r) == args.dataset]
    text = table(rows)
    print(text)
    if args.write:
        plot([r for r in all_rows if r["config"] in CONFIGS], OUT)
        marker, title = SECTION[args.dataset]
        write_section(marker, f"## Privacy-utility frontier ({title})\n\n" + header() +
                      f"- attacks: {', '.join(ATTACKS)}; demo sizes (members, steps, LoRA) from "
                      f"`DemoConfig(dataset=\"{args.dataset}\")`\n\n" + text + f"\n![frontier]({OUT.name})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
