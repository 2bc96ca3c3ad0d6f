"""The verdict's false-alarm rate on an untouched model at the sizes the project measures (issue 27, item 4).

An untouched model (the shipped emoji base with a zero LoRA: it saw nothing) gives every image the
same per-image quantities whoever is called a member: its loss grids, SimA / PIA / SecMI / CLiD
statistics, GSA gradients and, since the reference LoRAs' IN/OUT patterns are fixed by their own
training, the reference grids of LiRA and RMIA. So the model work is done **once** for a pool of
images, and the null is then redrawn cheaply:

- **Pool.** ``2 * 192 = 384`` emoji images (the frontier's ``audited_pool("emoji", 192)``), with 8 plain
  reference LoRAs trained the frontier's M = 128 way (400 steps at batch 32) on balanced halves of it.
  One :class:`~smplora_plugin.audit.engine.ScoreContext` over the pool (audit seed 0, the defaults)
  computes and keeps every model quantity.
- **Fits.** A fit is one random calibration draw (64 members + 64 non-members from the pool) with
  every attack run on it (:meth:`Attack.run`, exactly as :func:`run_audit` does): the trained attacks
  (MLP, logistic regression, gradient boosting, quantile regression, GSA's classifier, CLiD-vec, the
  blind baseline) are fitted on its labels, the threshold attacks pick their candidate and sign, RMIA
  takes its calibration non-members as the population. A fit costs ~20 s (quantile regression's
  cross-fitted boosting is most of it), so fits are made once and kept in a bank.
- **Draws.** A run takes a fit and draws its evaluation members and non-members at random from the
  other 256 images (64 + 64; 128 + 128 for the single 128/128 run, i.e. every other image); a pooled
  draw takes ``k`` distinct fits (``k`` independently trained LoRAs, each with its own member draw) and
  pools them with :func:`~smplora_plugin.audit.pooled.pool_scores`, the code :func:`pool_reports` uses.
  The verdict is :func:`~smplora_plugin.audit.verdict.leak_test` and :func:`~.verdict.decide`, the code
  :func:`~.verdict.assess` uses (1000 label permutations, within runs when pooled). Given a fit, the
  evaluation labels of each draw are fresh; the fits are shared between draws (a draw of 16 runs uses
  16 of the bank's fits). Given the fits, each of the two permutation tests is exact (its scores are
  fixed before the labels are drawn), so sharing fits biases no rate; given the bank and the
  permutation seed (the audit's, the same in every draw), the draws are independent, so the
  Clopper-Pearson interval covers the false-alarm rate of this bank, which averages to at most the
  rule's level over banks.

The generation attack is left out by default: on an untouched model the LoRA's generations are the
base model's (adapter = base, same noise), so its score is 0 for every image, its AUC 0.5 under every
labelling, and it can be neither the headline nor the maximum. ``--attacks`` changes the list.

Run from the repository root (one core, niced; ~40 min, most of it the one-off model work):

  nice -n 10 python -m benchmarks.pooled_null --fits 48 --draws 1000 --write RESULTS_section.md
  python -m benchmarks.pooled_null --quick       # a toy pool and 2 references: the whole path in ~1 min

Model quantities and fits are cached under ``--cache`` (default ``$XDG_CACHE_HOME/smplora/pooled_null``),
keyed by everything that determines them; a rerun with more ``--fits`` only makes the missing ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from smplora_plugin.audit import metrics as M
from smplora_plugin.audit import stats as S
from smplora_plugin.audit.pooled import pool_scores
from smplora_plugin.audit.verdict import LEAKS, AttackScores, VerdictSettings, decide, leak_test
from smplora_plugin.errors import ConfigError

from ._common import atomic_write_text, header, json_default

#: Bump when a change here or in the code it calls changes what a cached fit would be.
POOLED_NULL_VERSION = 1
REFERENCE_SEED = 2027
DEFAULT_ATTACKS = ("loss", "loss_calibrated", "loss_best_t", "sima", "secmi", "pia", "clid", "clid_vec", "mlp",
                   "logreg", "gboost", "blind", "quantile", "gsa", "lira_online", "lira_offline", "rmia")


@dataclass(frozen=True)
class Setting:
    """What the pool, the references, the audit and the sizes are."""

    dataset: str = "emoji"
    pool_members: int = 192  # the pool is audited_pool(dataset, pool_members): 2 * pool_members images
    references: int = 8
    reference_steps: int = 400  # the frontier's M = 128 recipe: 100 epochs at batch 32
    cal_per_side: int = 64
    audit: Mapping[str, Any] = field(default_factory=lambda: {"seed": 0})
    attacks: Tuple[str, ...] = DEFAULT_ATTACKS
    #: (runs, evaluation members = non-members per run)
    sizes: Tuple[Tuple[int, int], ...] = ((1, 64), (1, 128), (8, 64), (16, 64))

    def validate(self) -> None:
        n_free = 2 * self.pool_members - 2 * self.cal_per_side
        for runs, side in self.sizes:
            if runs < 1 or side < 4 or 2 * side > n_free:
                raise ConfigError(f"size ({runs} runs, {side} per side) does not fit a pool of {2 * self.pool_members} "
                                  f"with {self.cal_per_side} calibration samples per side.")
        if self.references < 2 or self.references % 2:
            raise ConfigError(f"references={self.references}: an even number >= 2 (balanced halves).")

    def key(self) -> Dict[str, Any]:
        from smplora_plugin import __version__
        from smplora_plugin.demo.pipeline import DemoConfig, base_recipe

        cfg = DemoConfig(dataset=self.dataset)
        return {"version": POOLED_NULL_VERSION, "smplora": __version__, "model": cfg.data.model_config.fingerprint(),
                "base": base_recipe(cfg), "dataset": self.dataset, "pool_members": self.pool_members,
                "references": self.references, "reference_steps": self.reference_steps, "audit": dict(self.audit),
                "attacks": list(self.attacks), "cal_per_side": self.cal_per_side}


QUICK = Setting(pool_members=24, references=2, reference_steps=10, cal_per_side=8,
                audit={"seed": 0, "draws": 1, "timesteps": [100, 300], "mlp_max_epochs": 5},
                attacks=("loss", "loss_calibrated", "loss_best_t", "logreg", "lira_online", "lira_offline", "rmia"),
                sizes=((1, 8), (1, 16), (4, 8)))


# ---------------------------------------------------------------------------------------------
# the redraw machinery (no model: a bank of fits in, verdicts out)


@dataclass
class Fit:
    """Every attack run on one calibration draw of the pool (pool indices throughout).

    ``scores[a]``: attack ``a``'s scores for every pool image; ``cal_index[a]``: the calibration images
    whose scores may set its threshold (the MLP keeps only its early-stopping part); ``cal_auc[a]``: the
    calibration AUC the headline is chosen by (the attack's own, as in :func:`run_audit`).
    """

    members: np.ndarray  # calibration members
    nonmembers: np.ndarray  # calibration non-members
    scores: Dict[str, np.ndarray]
    cal_index: Dict[str, np.ndarray]
    cal_auc: Dict[str, float]
    uses_model: Dict[str, bool]

    def free(self, n_pool: int) -> np.ndarray:
        """Pool images outside this fit's calibration draw (where its evaluation samples come from)."""
        return np.setdiff1d(np.arange(n_pool), np.r_[self.members, self.nonmembers])

    def run(self, eval_members: np.ndarray, eval_nonmembers: np.ndarray,
            plant: float = 0.0) -> Tuple[Dict[str, AttackScores], np.ndarray]:
        """The run's :class:`AttackScores` (evaluation members first, as :func:`run_audit` orders them) and labels.

        ``plant``: added to the evaluation members' scores, in units of each attack's calibration
        non-member SD (a planted signal, to check that the machinery can see one)."""
        ev = np.r_[eval_members, eval_nonmembers]
        y = np.r_[np.ones(len(eval_members), int), np.zeros(len(eval_nonmembers), int)]
        out = {}
        for a, s in self.scores.items():
            ci = self.cal_index[a]
            cal_labels = np.isin(ci, self.members).astype(int)
            e = s[ev].astype(np.float64)
            if plant:
                e = e + plant * max(float(s[ci][cal_labels == 0].std()), 1e-12) * y
            out[a] = AttackScores(e, s[ci].astype(np.float64), cal_labels, uses_model=self.uses_model[a])
        return out, y


def draw_verdict(fits: Sequence[Fit], rng: np.random.Generator, per_side: int, n_pool: int, *,
                 settings: Optional[VerdictSettings] = None, seed: int = 0, plant: float = 0.0) -> Dict[str, Any]:
    """One null draw over ``fits`` (one fit per run): fresh evaluation halves, then the audit's verdict.

    One fit: the single-run verdict on that run's scores (calibration AUCs as the attacks report them).
    Several: the pooled verdict (per-run standardisation, calibration AUC of the pooled calibration
    scores, label permutations within runs), as :func:`~smplora_plugin.audit.pooled.pool_reports` gives it.
    """
    st = settings or VerdictSettings()
    runs, labels = [], []
    for f in fits:
        free = f.free(n_pool)
        pick = rng.permutation(free)[:2 * per_side]
        sc, y = f.run(np.sort(pick[:per_side]), np.sort(pick[per_side:]), plant=plant)
        runs.append(sc)
        labels.append(y)
    model = [a for a in runs[0] if runs[0][a].uses_model]
    if len(fits) == 1:
        scores, cal_auc, strata = {a: runs[0][a] for a in model}, {a: fits[0].cal_auc[a] for a in model}, None
    else:
        scores = pool_scores(runs, model)
        cal_auc = {a: scores[a].calibration_auc for a in model}
        strata = np.concatenate([np.full(y.size, i) for i, y in enumerate(labels)])
    y = np.concatenate(labels).astype(bool)
    aucs = {a: M.auc(scores[a].eval_scores[y], scores[a].eval_scores[~y]) for a in model}
    test = leak_test(scores, y, aucs, cal_auc, seed=seed, strata=strata, settings=st, tpr_null=False)
    n1, n0 = int(y.sum()), int((~y).sum())
    sda = S.smallest_detectable_auc(n1, n0, alpha=st.alpha / 2, power=st.power)
    env = max(model, key=lambda a: aucs[a])
    return {"verdict": decide(test["p_headline"], test["p_envelope"], sda, st), "p_headline": test["p_headline"],
            "p_envelope": test["p_envelope"], "headline": test["headline"], "headline_auc": aucs[test["headline"]],
            "envelope": env, "envelope_auc": aucs[env], "n_member": n1, "n_nonmember": n0}


def measure(fits: Sequence[Fit], runs: int, per_side: int, draws: int, n_pool: int, *, seed: int = 0,
            plant: float = 0.0, settings: Optional[VerdictSettings] = None) -> List[Dict[str, Any]]:
    """``draws`` draws at one size: one run uses fit ``d mod len(fits)``; ``runs > 1`` takes distinct fits at random."""
    if runs > len(fits):
        raise ConfigError(f"{runs} runs per draw need at least {runs} fits, got {len(fits)}; raise --fits.")
    rows = []
    for d in range(draws):
        rng = np.random.default_rng([seed, runs, per_side, d])
        chosen = [fits[d % len(fits)]] if runs == 1 else [fits[i] for i in rng.choice(len(fits), runs, replace=False)]
        rows.append({"runs": runs, "per_side": per_side, "draw": d, "plant": plant,
                     **draw_verdict(chosen, rng, per_side, n_pool, settings=settings, plant=plant)})
    return rows


def rate(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """False alarms ('leaks'), their rate and its two-sided 95% Clopper-Pearson interval."""
    k, n = sum(r["verdict"] == LEAKS for r in rows), len(rows)
    lo, hi = S.clopper_pearson(k, n)
    return {"leaks": k, "draws": n, "rate": k / n, "ci95": (lo, hi),
            "by_headline": sum(r["p_headline"] < 0.025 for r in rows),
            "by_envelope": sum(r["p_envelope"] < 0.025 for r in rows)}


# ---------------------------------------------------------------------------------------------
# the model work: references, one score context, the bank of fits (cached)


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/smplora/pooled_null`` (``~/.cache`` when unset or relative)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "smplora" / "pooled_null"


def _save(path: Path, tensors: Dict[str, Any], meta: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    from ._common import atomic_write

    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "tensors.safetensors",
                 lambda tmp: save_file({k: torch.as_tensor(v).clone().contiguous() for k, v in tensors.items()}, tmp))
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=1, default=json_default))


def _load(path: Path) -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]]:
    if not (path / "meta.json").is_file():
        return None
    from safetensors.torch import load_file

    return ({k: v.numpy() for k, v in load_file(str(path / "tensors.safetensors")).items()},
            json.loads((path / "meta.json").read_text()))


def _flatten(value: Any, name: str, out: Dict[str, Any]) -> Any:
    """A cached context value as tensors in ``out`` and a JSON skeleton naming them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, dict):
        return {"dict": {str(k): _flatten(v, f"{name}.{k}", out) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        return {"seq": [_flatten(v, f"{name}.{i}", out) for i, v in enumerate(value)]}
    if isinstance(value, (np.ndarray, torch.Tensor)):
        out[name] = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
        return {"tensor": name, "numpy": isinstance(value, np.ndarray)}
    raise ConfigError(f"cannot cache a context value of type {type(value).__name__} ({name}).")


def _unflatten(skel: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    if "value" in skel:
        return skel["value"]
    if "dict" in skel:
        return {k: _unflatten(v, tensors) for k, v in skel["dict"].items()}
    if "seq" in skel:
        return tuple(_unflatten(s, tensors) for s in skel["seq"])
    v = tensors[skel["tensor"]]
    return v if skel["numpy"] else torch.as_tensor(v)


class Bank:
    """The pool, its references and score context, and the fits made on it (cached under ``root``)."""

    def __init__(self, setting: Setting, root: Path, log=print):
        from .frontier import settings_key

        setting.validate()
        self.setting, self.log = setting, log
        self.root = Path(root) / settings_key(setting.key())
        self._ctx = None
        self._attacks = None
        from .frontier import audited_pool

        self.pool, self.defense = audited_pool(setting.dataset, setting.pool_members)
        self.n = len(self.pool)

    # -- model work --------------------------------------------------------------------------
    def _references(self, cfg, base_sd):
        from smplora_plugin.audit import References
        from smplora_plugin.audit.references import balanced_halves
        from smplora_plugin.demo.target import TinyLDMTarget

        from .frontier import Recipe, _new_model, train_one

        st = self.setting
        rc = Recipe(dataset=st.dataset, members=st.pool_members, steps=st.reference_steps, references=st.references)
        keep = balanced_halves(self.n, st.references, REFERENCE_SEED)
        pairs = []
        for r in range(st.references):
            train = self.pool.subset(np.flatnonzero(keep[r]).tolist())
            seed = 50_000 + r
            got = _load(self.root / f"reference_{r}")
            model = _new_model(cfg, base_sd, rc.lora_rank, seed)
            if got is None:
                t0 = time.time()
                model, _ = train_one(rc, {"kind": "plain"}, train, self.defense, seed, cfg, base_sd)
                _save(self.root / f"reference_{r}", model.lora_state_dict(), {"trained_ids": list(train.ids)})
                self.log(f"reference {r}: trained in {time.time() - t0:.0f} s")
            else:
                model.load_lora_state_dict({k: torch.as_tensor(v) for k, v in got[0].items()})
            model.requires_grad_(False)
            pairs.append((TinyLDMTarget(model), list(train.ids)))
        return References.from_targets(pairs, mode="online")

    def context(self):
        """The score context over the whole pool, every model quantity computed (or read from the cache)."""
        if self._ctx is not None:
            return self._ctx
        from smplora_plugin.audit import AuditSamples
        from smplora_plugin.audit.attacks import resolve_attacks
        from smplora_plugin.audit.config import as_config
        from smplora_plugin.audit.engine import ScoreContext
        from smplora_plugin.audit.references import check_compatible, match
        from smplora_plugin.demo.target import TinyLDMTarget

        from .frontier import _new_model, _setup

        torch.set_flush_denormal(True)
        cfg, base, _ = _setup(self.setting.dataset)
        base_sd = base.base_state_dict()
        untouched = _new_model(cfg, base_sd, 8, 0)  # a zero LoRA: the base model, audited as if it had members
        untouched.requires_grad_(False)
        target = TinyLDMTarget(untouched)
        refs = self._references(cfg, base_sd)
        samples = AuditSamples(self.pool.images, self.pool.captions, self.pool.ids)
        ctx = ScoreContext(target, samples.images, list(samples.captions), as_config(dict(self.setting.audit)),
                           progress=False)
        ctx.references = match(refs, samples)
        check_compatible(ctx.references, target, samples.images)
        self._attacks = resolve_attacks(list(self.setting.attacks), True, False, target=target)
        got = _load(self.root / "context")
        if got is not None:
            tensors, meta = got
            ctx._cache.update({k: _unflatten(s, tensors) for k, s in meta["skeleton"].items()})
            ctx.passes.update(meta["passes"])
        else:
            lab = np.zeros(self.n, int)
            lab[: self.n // 2] = 1
            t0 = time.time()
            for a in self._attacks:  # the first run of every attack computes its model quantities
                ta = time.time()
                a.run(ctx, np.arange(self.n), lab)
                self.log(f"context: {a.name} {time.time() - ta:.0f} s")
            tensors: Dict[str, Any] = {}
            skel = {k: _flatten(v, f"q{i}", tensors) for i, (k, v) in enumerate(ctx._cache.items())}
            _save(self.root / "context", tensors, {"skeleton": skel, "passes": ctx.passes,
                                                    "seconds": round(time.time() - t0, 1)})
        self._ctx = ctx
        return ctx

    def fit(self, i: int) -> Fit:
        """Fit ``i`` (calibration draw seeded by ``i``), made now or read from the cache."""
        path = self.root / f"fit_{i}"
        got = _load(path)
        if got is None:
            ctx = self.context()
            side = self.setting.cal_per_side
            perm = np.random.default_rng([7_001, i]).permutation(self.n)
            mem, non = np.sort(perm[:side]), np.sort(perm[side:2 * side])
            cal_index = np.r_[mem, non]  # members first, as run_audit orders the calibration split
            cal_labels = np.r_[np.ones(side, int), np.zeros(side, int)]
            tensors: Dict[str, Any] = {"members": mem, "nonmembers": non}
            meta: Dict[str, Any] = {"cal_auc": {}, "uses_model": {}, "seconds": {}}
            for a in self._attacks:
                t0 = time.time()
                out = a.run(ctx, cal_index, cal_labels)
                s, ci = np.asarray(out.scores, dtype=np.float64), np.asarray(out.calibration_index)
                lab = np.isin(ci, mem)
                auc = out.chosen.get("calibration_auc", M.auc(s[ci][lab], s[ci][~lab]))  # as run_audit reads it
                tensors[f"{a.name}.scores"], tensors[f"{a.name}.cal_index"] = s, ci
                meta["cal_auc"][a.name], meta["uses_model"][a.name] = float(auc), bool(a.uses_model)
                meta["seconds"][a.name] = round(time.time() - t0, 2)
            _save(path, tensors, meta)
            got = ({k: np.asarray(v) for k, v in tensors.items()}, meta)
        t, meta = got
        names = list(meta["cal_auc"])
        return Fit(t["members"], t["nonmembers"], {a: t[f"{a}.scores"] for a in names},
                   {a: t[f"{a}.cal_index"] for a in names}, dict(meta["cal_auc"]), dict(meta["uses_model"]))


# ---------------------------------------------------------------------------------------------
# report


def size_name(runs: int, per_side: int) -> str:
    return f"single run {per_side}/{per_side}" if runs == 1 else f"{runs} runs of {per_side}/{per_side}"


def table(rows: Sequence[Mapping[str, Any]], n_fits: int, rule: str) -> str:
    lines = ["| size | runs | evaluation members / non-members | draws | fits | false alarms ('leaks') | rate | "
             "95% CI (Clopper-Pearson) | headline p < 0.025 | envelope p < 0.025 | rule |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({(r["runs"], r["per_side"]) for r in rows}, key=lambda k: (k[0], k[1])):
        rs = [r for r in rows if (r["runs"], r["per_side"]) == key]
        q = rate(rs)
        lines.append(f"| {size_name(*key)} | {key[0]} | {rs[0]['n_member']} / {rs[0]['n_nonmember']} | {q['draws']} | "
                     f"{min(n_fits, q['draws'] * key[0])} | {q['leaks']} | {100 * q['rate']:.1f}% | "
                     f"[{100 * q['ci95'][0]:.1f}%, {100 * q['ci95'][1]:.1f}%] | {q['by_headline']} | "
                     f"{q['by_envelope']} | {rule} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fits", type=int, default=48, help="calibration draws with every attack fitted (the bank)")
    p.add_argument("--draws", type=int, default=200, help="null draws per size")
    p.add_argument("--plant", type=float, default=0.0,
                   help="add this many calibration SDs to the evaluation members' scores (a power check)")
    p.add_argument("--attacks", default="", help="comma-separated attacks (default: the suite, generation left out)")
    p.add_argument("--cache", default=str(default_cache()), help="cache folder (default $XDG_CACHE_HOME/smplora/"
                                                                  "pooled_null)")
    p.add_argument("--quick", action="store_true", help="a toy pool, 2 references, 4 fits, 20 draws: the whole path")
    p.add_argument("--rows", default="", help="write every draw's row here (JSON lines)")
    p.add_argument("--write", default="", help="write the Markdown section here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setting = QUICK if args.quick else Setting()
    if args.attacks:
        setting = dataclasses.replace(setting, attacks=tuple(a for a in args.attacks.split(",") if a))
    n_fits, draws = (4, 20) if args.quick else (args.fits, args.draws)
    if n_fits < max(r for r, _ in setting.sizes) or draws < 1:
        raise SystemExit(f"--fits must be at least {max(r for r, _ in setting.sizes)} and --draws at least 1.")
    t0 = time.time()
    bank = Bank(setting, Path(args.cache), log=lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True))
    fits = []
    for i in range(n_fits):
        fits.append(bank.fit(i))
        print(f"[{time.time() - t0:6.0f} s] fit {i + 1}/{n_fits}", flush=True)
    t_fits = time.time() - t0
    rows: List[Dict[str, Any]] = []
    for runs, side in setting.sizes:
        rows += measure(fits, runs, side, draws, bank.n, plant=args.plant)
        q = rate(rows[-draws:])
        print(f"[{time.time() - t0:6.0f} s] {size_name(runs, side)}: {q['leaks']}/{q['draws']} 'leaks'", flush=True)
    if args.rows:
        atomic_write_text(Path(args.rows), "".join(json.dumps(r, default=json_default) + "\n" for r in rows))
    rule = "min(p_headline, p_envelope) < 0.025 (Bonferroni)"
    what = "planted member shift of {:g} calibration SDs: power".format(args.plant) if args.plant else "untouched model"
    text = (f"## Verdict calibration: pooled null\n\n{header()}- setting: {what}; pool of {bank.n} "
            f"{setting.dataset} images, {setting.references} reference LoRAs ({setting.reference_steps} steps), "
            f"calibration {setting.cal_per_side} + {setting.cal_per_side} per run, attacks "
            f"{', '.join(setting.attacks)}\n- wall time: {time.time() - t0:.0f} s ({t_fits:.0f} s model work and "
            f"fits); CPU time of this process {time.process_time():.0f} s\n\n{table(rows, n_fits, rule)}\n")
    print(text)
    if args.write:
        atomic_write_text(Path(args.write), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
