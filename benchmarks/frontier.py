"""The privacy-utility frontier measured with audit v2 (issue 11), cached and resumable.

Design (per data set and member count ``M``):

- **Audited pool.** A fixed set ``A`` of ``2M`` private images (``splits(seed=0)``'s ``member``
  set) and a fixed defense set of non-members (seen only by a defense's proxy or loss floor).
- **Runs.** Run ``i`` of a row draws its members as a seeded random half of ``A`` (``M`` images);
  the other half are its non-members. Each half is split in two: calibration and evaluation.
  The LoRA init, batches and noise are seeded by ``i``; every row's run ``i`` sees the same draw.
  Above ``--audited`` (128) members a run audits only a seeded draw of 128 members and 128
  non-members (half calibration); the LoRA still trains on all ``M``, and large ``M`` costs no
  more to audit.
- **References.** ``R`` plain reference LoRAs per ``(data set, M)``, trained the target's way on
  balanced halves of ``A`` (each image IN for exactly ``R/2`` of them), shared by every row and
  run at that member count: online LiRA, offline LiRA and RMIA join the default suite.
- **Audit.** The whole default suite (:func:`smplora_plugin.audit.run_audit`, one audit seed for
  every run: common noise draws), then the runs are pooled with
  :func:`smplora_plugin.audit.pooled.pool_reports` (per-run standardisation on calibration
  non-members, calibrated verdict, stratified permutations).
- **Canaries** (issue 23; ``--canaries N``, off by default). A fixed universe of ``2N`` fresh private images
  (disjoint from ``A`` and the defense set) in ``N`` pairs; pair ``j`` is made one of the most exposed kinds
  (:data:`CANARY_KINDS`, cycled): duplicated (trained twice), colour-inverted, rotated (out of distribution,
  with their captions), caption-swapped. Run ``i`` trains on one image of each pair (seeded by ``i``) besides
  its ``M`` members and audits the other as its matching non-member; references train on balanced halves of
  the universe too, so online LiRA / RMIA cover the canaries. The canaries join the evaluation sides of the
  run's one audit (:func:`audit_with_canaries`: the same draws and fits; the population's report is the one
  ``run_audit`` gives on the population alone); their scores are pooled over runs, standardised like the
  population's, and reported beside it (AUC, TPR@1%FPR, per kind, the paired test against the untouched
  model's canaries). A recipe with canaries trains on more rows, so its LoRAs, references and audits have
  keys of their own; without canaries the keys are the old ones.
- **Kinds.** ``untouched``, ``plain``, ``smp`` / ``mp`` / ``robust`` (the demo's ``train_lora`` with a
  regulariser), ``dpsgd`` (Opacus per-sample gradients: sigma ``noise``, clip ``clip``, noise multiplicity
  ``noise_mult``, ``flip``), ``smp_dp`` (the ``robust`` preset under the core's DP-SGD, ``DPTraining`` with
  ``reg.step_per_sample``), ``floor``, ``distill`` (issue 23: a student LoRA trained against teacher LoRAs'
  predictions, :func:`train_distilled`); every DP row records its epsilon (delta 1e-5, RDP).
- **Utility.** The data set's classifier on generated samples (accuracy; for textures the share of
  samples of the captioned class), Fréchet distance in its feature space, held-out denoising loss.
  The style / concept **gain kept** is ``(acc - acc_untouched) / (acc_plain - acc_untouched)``.
- **Reference memo.** A reference's noise predictions are memoised per input row on disk
  (``<cache>/refeps``): every run at one ``(data set, M)`` queries the same images at the same
  noise draws, so LiRA/RMIA's reference grids (more than half of an audit) are computed once.
- **Cache.** Every trained LoRA (``<cache>/lora/<key>``) and every run's audit scores and utility
  (``<cache>/audit/<key>``) are stored under a hash of everything that determines them (data set,
  model and base recipe, ``M``, run, row settings, steps, LoRA recipe, audit settings, reference
  keys, :data:`FRONTIER_VERSION`). Re-running skips what is cached, so the frontier runs in parts
  across sittings. The cache lives outside the repository (``--cache``; default
  ``$SMPLORA_FRONTIER_CACHE``, else ``$XDG_CACHE_HOME/smplora/frontier``, i.e. ``~/.cache/smplora/frontier``).
- **Workers.** ``run`` trains and audits the missing runs in ``--jobs`` spawned worker processes (one torch
  thread each, niced by ``--nice``, a fresh process per task); a task's result is its cache entry.

Run from the repository root (two jobs at a time, one thread each, niced):

  python -m benchmarks.frontier run --dataset textures --members 64 --rows untouched,plain,robust --runs 8 --jobs 2
  python -m benchmarks.frontier report --write      # pools every finished point: RESULTS.md, PNG, rows jsonl
  python -m benchmarks.frontier run --dataset emoji --members 128 --steps 400 --canaries \
      --rows untouched,plain,"dp-sgd s0.3" --runs 8 --jobs 2   # issue 23: with 8 canaries per run
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from smplora_plugin import hookimpl
from smplora_plugin.errors import ConfigError
from smplora_plugin.plugins import DefaultFeatures

from ._common import atomic_write, fmt, header, json_default, pct, run_in_workers, write_section

HERE = Path(__file__).resolve().parent
#: Bump when a change to this harness or to the code it calls changes what a cached result would be.
#: 2: RMIA's score breaks the ties of the paper's fraction (issue 27), so cached audit scores are stale.
FRONTIER_VERSION = 2
#: Bump when a change to the audit (not to training) changes what a cached audit would be: it keys the audits only,
#: so the trained LoRAs and references are kept. 1: RMIA's audited samples meet P - 1 population samples, as the
#: calibration non-members do (the tie-break had ranked the latter higher under no signal; issue 27).
AUDIT_VERSION = 1
ROWS_JSONL = HERE / "frontier_rows.jsonl"
PNG = HERE / "frontier.png"
DEFENSE_NONMEMBERS = 64
REFERENCE_SEED = 2027

#: name -> (family, settings). ``grid``: the pooling grid's SD1.5 analogue (64 = no pooling at 64x64
#: latents); on the tiny latents it becomes ``latent * grid / 64`` per side. ``steps_frac``: early stopping.
ROWS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "untouched": ("untouched", {"kind": "untouched"}),
    "plain": ("plain", {"kind": "plain"}),
    "plain stop@1/4": ("plain", {"kind": "plain", "steps_frac": 0.25}),
    "plain stop@1/2": ("plain", {"kind": "plain", "steps_frac": 0.5}),
    "plain flip": ("plain", {"kind": "plain", "flip": True}),
    "smp paper features a10 k5": ("smp paper", {"kind": "smp", "alpha": 10.0, "k_steps": 5, "attacker_lr": 1e-3,
                                                "grid": 64}),
    "robust": ("robust", {"kind": "robust"}),
    "robust grid16": ("robust", {"kind": "robust", "grid": 16}),
    "robust grid64": ("robust", {"kind": "robust", "grid": 64}),
    "robust a5": ("robust", {"kind": "robust", "alpha": 5.0}),
    "robust a50": ("robust", {"kind": "robust", "alpha": 50.0}),
    "robust whole-batch": ("robust", {"kind": "robust", "privacy_fraction": 1.0}),
    "robust k5": ("robust", {"kind": "robust", "k_steps": 5}),
    "robust attacker-lr 1e-4": ("robust", {"kind": "robust", "attacker_lr": 1e-4}),
    "robust attacker-lr 1e-2": ("robust", {"kind": "robust", "attacker_lr": 1e-2}),
    "robust wide attacker": ("robust", {"kind": "robust", "hidden": [1024, 512]}),
    "robust flip": ("robust", {"kind": "robust", "flip": True}),
    # the timestep-conditioned features: the proxy also sees each sample's t (TimestepChannels)
    "robust flip t-feature": ("robust", {"kind": "robust", "flip": True, "tfeat": True}),
    "robust flip k2": ("robust", {"kind": "robust", "flip": True, "k_steps": 2}),
    "robust flip k5": ("robust", {"kind": "robust", "flip": True, "k_steps": 5}),
    # issue 23: SMP with noise multiplicity in the privacy term (each privacy row's features the mean over 4 noise /
    # timestep draws) and caption randomisation (each caption empty with probability 0.3, members and the defense's
    # non-members alike), on `robust` + flip; and the multiplicity alone
    "robust flip K4 cap0.3": ("robust", {"kind": "robust", "flip": True, "privacy_draws": 4,
                                         "caption_dropout": 0.3}),
    "robust flip K4": ("robust", {"kind": "robust", "flip": True, "privacy_draws": 4}),
    "mp a0.05": ("mp", {"kind": "mp", "alpha": 0.05, "attacker_lr": 1e-3, "grid": 64}),
    "dp-sgd s0.5": ("dp-sgd", {"kind": "dpsgd", "noise": 0.5, "clip": 0.05}),
    "dp-sgd s1": ("dp-sgd", {"kind": "dpsgd", "noise": 1.0, "clip": 0.05}),
    "dp-sgd s2": ("dp-sgd", {"kind": "dpsgd", "noise": 2.0, "clip": 0.05}),
    "dp-sgd s4": ("dp-sgd", {"kind": "dpsgd", "noise": 4.0, "clip": 0.05}),
    "loss floor": ("loss floor", {"kind": "floor"}),
    # per-sample gradient clipping without noise (no DP guarantee), the clipping lever
    "clip only": ("clipping", {"kind": "dpsgd", "noise": 0.0, "clip": 0.05}),
    # issue 23: DP-SGD tuned for utility. sigma down from 0.5 (clip 0.05), the clip up to 1 (no clipping for most
    # samples), noise multiplicity K (K noise / timestep draws per member, averaged before clipping: no privacy
    # cost, K times the compute) and flip augmentation inside the clipped per-member gradient
    "dp-sgd s0.05": ("dp-sgd", {"kind": "dpsgd", "noise": 0.05, "clip": 0.05}),
    "dp-sgd s0.1": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 0.05}),
    "dp-sgd s0.2": ("dp-sgd", {"kind": "dpsgd", "noise": 0.2, "clip": 0.05}),
    "dp-sgd s0.3": ("dp-sgd", {"kind": "dpsgd", "noise": 0.3, "clip": 0.05}),
    "dp-sgd s0.1 c0.2": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 0.2}),
    "dp-sgd s0.1 c1": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 1.0}),
    "dp-sgd s0.3 c0.2": ("dp-sgd", {"kind": "dpsgd", "noise": 0.3, "clip": 0.2}),
    "dp-sgd s0.1 K4": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 0.05, "noise_mult": 4}),
    "dp-sgd s0.1 flip": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 0.05, "flip": True}),
    "dp-sgd s0.1 K4 flip": ("dp-sgd", {"kind": "dpsgd", "noise": 0.1, "clip": 0.05, "noise_mult": 4, "flip": True}),
    "dp-sgd s0.3 K4 flip": ("dp-sgd", {"kind": "dpsgd", "noise": 0.3, "clip": 0.05, "noise_mult": 4, "flip": True}),
    "dp-sgd s0.2 K4 flip": ("dp-sgd", {"kind": "dpsgd", "noise": 0.2, "clip": 0.05, "noise_mult": 4, "flip": True}),
    "dp-sgd s0.05 c1 K8 flip": ("dp-sgd", {"kind": "dpsgd", "noise": 0.05, "clip": 1.0, "noise_mult": 8,
                                            "flip": True}),
    # issue 23: SMP-LoRA (robust preset) under per-sample clipping and small noise, trained with the core's DP-SGD
    # (DPTraining + reg.step_per_sample: each member's own SMP term, every row a privacy row, so
    # privacy_fraction only sets the non-member batch: 8 of 32 for the preset, 32 for whole-batch)
    "robust flip dp s0.1 c0.05": ("smp + dp", {"kind": "smp_dp", "noise": 0.1, "clip": 0.05, "flip": True}),
    "robust flip dp s0.3 c0.05": ("smp + dp", {"kind": "smp_dp", "noise": 0.3, "clip": 0.05, "flip": True}),
    "robust flip dp s0.1 c0.2": ("smp + dp", {"kind": "smp_dp", "noise": 0.1, "clip": 0.2, "flip": True}),
    "robust whole-batch dp s0.3 c0.05": ("smp + dp", {"kind": "smp_dp", "noise": 0.3, "clip": 0.05,
                                                      "privacy_fraction": 1.0}),
    # issue 23: disjoint-shard distillation (benchmarks/distill.py): S plain teachers on disjoint shards of the
    # members (exact copies share a shard), the student trained on every member against the mean prediction of
    # the teachers that never saw it
    "distill s2": ("distill", {"kind": "distill", "shards": 2}),
    # the student never sees a member: one plain teacher on all members, the student trained on the defense's
    # held-out images (the set SMP-LoRA's proxy uses) against the teacher's predictions at their noisy inputs
    "distill holdout": ("distill", {"kind": "distill", "inputs": "holdout"}),
    # issue 23: aggregate of shard LoRAs (benchmarks/shard_aggregate.py): S plain LoRAs on disjoint shards dealt
    # by content hash, the mean of their weight deltas refactored to the LoRA's rank (a spec with clip and noise
    # clips each shard's deltas and noises the mean once; `python -m benchmarks.shard_aggregate` measures what that
    # noise does). The shard LoRAs are cached apart, so specs that differ only in clip and noise share them
    "shard avg s4": ("shard aggregate", {"kind": "shard_agg", "shards": 4}),
    "shard avg s8": ("shard aggregate", {"kind": "shard_agg", "shards": 8}),
    "shard avg s16": ("shard aggregate", {"kind": "shard_agg", "shards": 16}),
}
FAMILY_ORDER = ("untouched", "plain", "smp paper", "robust", "mp", "dp-sgd", "loss floor", "clipping", "smp + dp",
                "distill", "shard aggregate")
KINDS = ("untouched", "plain", "smp", "robust", "mp", "dpsgd", "floor", "smp_dp", "distill", "shard_agg")
#: issue 23's most exposed members, cycled over a run's canaries: the image twice in the training set, the image
#: colour-inverted or rotated by 90 degrees (out of distribution, with its own caption), the image with another
#: image's caption
CANARY_KINDS = ("duplicate", "inverted", "rotated", "caption-swap")
CANARY_SEED = 300_007


# ---------------------------------------------------------------------------------------------
# settings and keys


@dataclass(frozen=True)
class Recipe:
    """What every run of one frontier shares: LoRA recipe, audit settings, utility settings."""

    dataset: str
    members: int
    steps: int
    runs: int = 8
    references: int = 8
    batch_size: int = 32
    lora_rank: int = 8
    lora_lr: float = 1e-3
    audit: Mapping[str, Any] = field(default_factory=lambda: {"n_boot": 200})
    attacks: Optional[Tuple[str, ...]] = None  # None: the whole default suite (+ LiRA/RMIA with references)
    per_label: int = 20
    sample_steps: int = 20
    #: at most this many members (and as many non-members) of a run are audited, half of them calibration;
    #: above it a run's audited samples are a seeded draw of its members, so large M costs no more to audit
    audited: int = 128
    #: canaries per run (issue 23): this many member canaries (:data:`CANARY_KINDS`, cycled) trained on besides the
    #: ``members``, and as many matching non-member canaries, scored by the same audit; 0: none (the old runs)
    canaries: int = 0

    def validate(self) -> None:
        from smplora_plugin.demo.datasets import NAMES

        if self.dataset not in NAMES:
            raise ConfigError(f"unknown data set {self.dataset!r}; choose one of {list(NAMES)}.")
        for name in ("members", "steps", "runs", "batch_size", "lora_rank", "per_label", "sample_steps", "audited"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}.")
        if self.members < 8 or self.members % 4:
            raise ConfigError(f"members={self.members}: use a multiple of 4, at least 8 (calibration and evaluation "
                             "halves of members and non-members).")
        if self.audited < 8 or self.audited % 4:
            raise ConfigError(f"audited={self.audited}: use a multiple of 4, at least 8.")
        if self.references == 1 or self.references < 0 or self.references % 2:
            raise ConfigError(f"references={self.references}: 0 (no LiRA/RMIA) or an even number >= 2.")
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or self.canaries < 0:
            raise ConfigError(f"canaries={self.canaries!r}: a whole number >= 0 per run (0: no canaries; issue 23: 8).")


def settings_key(settings: Mapping[str, Any]) -> str:
    """A 20-hex-digit SHA-256 of the settings' canonical JSON (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _code_facts(dataset: str) -> Dict[str, Any]:
    from smplora_plugin import __version__
    from smplora_plugin.demo.pipeline import DemoConfig, base_recipe

    cfg = DemoConfig(dataset=dataset)
    return {"frontier_version": FRONTIER_VERSION, "smplora": __version__, "model": cfg.data.model_config.fingerprint(),
            "base": base_recipe(cfg), "pool": cfg.data.pool_tag}


def row_spec(row: str) -> Dict[str, Any]:
    if row not in ROWS:
        raise ConfigError(f"unknown row {row!r}; choose from {list(ROWS)}.")
    return dict(ROWS[row][1])


def lora_settings(rc: Recipe, spec: Mapping[str, Any], run: int, *, reference: Optional[int] = None) -> Dict[str, Any]:
    """Everything that determines one trained LoRA (target run or reference)."""
    d = {"code": _code_facts(rc.dataset), "dataset": rc.dataset, "members": rc.members, "steps": rc.steps,
         "batch_size": rc.batch_size, "lora_rank": rc.lora_rank, "lora_lr": rc.lora_lr,
         "defense_nonmembers": DEFENSE_NONMEMBERS, "spec": dict(spec)}
    if reference is None:
        d["run"] = run
    else:
        d.update(reference=reference, references=rc.references, reference_seed=REFERENCE_SEED)
    if rc.canaries:  # only with canaries, so the keys of the runs without them stay what they were
        d["canaries"] = {"n": rc.canaries, "kinds": list(CANARY_KINDS), "seed": CANARY_SEED}
    return d


def audit_settings(rc: Recipe, spec: Mapping[str, Any], run: int) -> Dict[str, Any]:
    """Everything that determines one run's audit scores and utility."""
    refs = [settings_key(lora_settings(rc, {"kind": "plain"}, 0, reference=r)) for r in range(rc.references)]
    d = {"lora": settings_key(lora_settings(rc, spec, run)), "audit": dict(rc.audit), "audit_version": AUDIT_VERSION,
         "attacks": None if rc.attacks is None else list(rc.attacks), "references": refs,
         "per_label": rc.per_label, "sample_steps": rc.sample_steps}
    if rc.audited < rc.members:  # only where the cap binds, so the keys of smaller points stay what they were
        d["audited"] = rc.audited
    if rc.canaries:
        d["canaries"] = rc.canaries
    return d


# ---------------------------------------------------------------------------------------------
# cache


def default_cache() -> Path:
    """``$SMPLORA_FRONTIER_CACHE``, else ``smplora/frontier`` in the user's cache folder (``$XDG_CACHE_HOME``,
    by default ``~/.cache``)."""
    if os.environ.get("SMPLORA_FRONTIER_CACHE"):
        return Path(os.environ["SMPLORA_FRONTIER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # a relative XDG path is ignored (the spec)
    return base / "smplora" / "frontier"


class Cache:
    """``<root>/lora/<key>/`` (LoRA + meta) and ``<root>/audit/<key>/`` (scores + meta); atomic writes."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def done(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "meta.json").is_file()

    def write(self, kind: str, key: str, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> Path:
        from safetensors.torch import save_file

        final = self.path(kind, key)
        tmp = final.with_name(f".{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=json_default))
        if final.exists():  # another worker finished the same key first: keep theirs
            shutil.rmtree(tmp)
            return final
        os.replace(tmp, final)
        return final

    def read(self, kind: str, key: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        p = self.path(kind, key)
        return json.loads((p / "meta.json").read_text()), load_file(str(p / "tensors.safetensors"))


# ---------------------------------------------------------------------------------------------
# data


def _setup(dataset: str):
    from smplora_plugin.demo.pipeline import DemoConfig, load_assets

    cfg = DemoConfig(dataset=dataset)
    loaded = load_assets(cfg)
    if loaded is None:  # never train a base model in every worker: the frontier needs the shipped weights
        raise SystemExit(f"no shipped base weights for {dataset!r} match this code; build them once with "
                         f"`python -m smplora_plugin.demo.make_assets --dataset {dataset}`.")
    base, clf = loaded
    return cfg, base, clf


@functools.lru_cache(maxsize=8)
def _private_sets(dataset: str, members: int, canaries: int):
    """The data set's private draw (seed 0): the audited pool, the defense set and, with ``canaries``, the
    ``2 * canaries`` canary sources after them (the sets are drawn in that order from one permutation, so the
    first two do not depend on ``canaries``). Memoised: drawing a pool costs seconds and a task asks often."""
    from smplora_plugin.demo.datasets import get_dataset

    sizes = {"member": 2 * members, "nonmember_defense": DEFENSE_NONMEMBERS}
    if canaries:
        sizes["nonmember_eval"] = 2 * canaries
    return get_dataset(dataset).splits(sizes, 0)


def audited_pool(dataset: str, members: int):
    """The fixed audited pool ``A`` (``2 * members``) and the defense's non-members (fresh copies)."""
    sp = _private_sets(dataset, members, 0)
    return sp["member"].subset(range(len(sp["member"]))), sp["nonmember_defense"].subset(
        range(len(sp["nonmember_defense"])))


def run_draw(n_pool: int, members: int, run: int, audited: Optional[int] = None) -> Dict[str, List[int]]:
    """Run ``run``'s indices into the pool: members / non-members, each split into calibration / evaluation.

    With ``audited < members`` only the first ``audited`` members and non-members of the run's permutation are
    audited (the LoRA still trains on all ``members``); otherwise all are."""
    perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(100_003 + run)).tolist()
    mem, non = perm[:members], perm[members:2 * members]
    a = members if audited is None else min(audited, members)
    h = a // 2
    return {"member": sorted(mem), "member_cal": sorted(mem[:h]), "member_eval": sorted(mem[h:a]),
            "nonmember_cal": sorted(non[:h]), "nonmember_eval": sorted(non[h:a])}


def _join(*sets):
    """The sets one after the other, captions kept (a set's captions may come from its labels)."""
    from smplora_plugin.demo.data import DigitSet

    return DigitSet(torch.cat([x.images for x in sets]), torch.cat([x.labels for x in sets]),
                    [i for x in sets for i in x.ids], [c for x in sets for c in x.captions])


def canary_universe(dataset: str, members: int, canaries: int):
    """The ``2 * canaries`` canary images of ``(dataset, members)`` and their kinds; ``(DigitSet, kinds)``.

    Sources: a fixed draw of fresh private images (the split after the audited pool and the defense set, so
    disjoint from both). Pair ``j`` (images ``2j`` and ``2j + 1``) has kind ``CANARY_KINDS[j % 4]``: a run
    trains on one of the pair (:func:`canary_draw`) and audits the other as its matching non-member.
    ``duplicate``: the image as it is (trained twice); ``inverted``: ``-x`` (colours inverted); ``rotated``: 90
    degrees; ``caption-swap``: the caption of the next source image with another caption. Ids are
    ``canary-<kind>:<source id>``.
    """
    from smplora_plugin.demo.data import DigitSet

    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
        raise ConfigError(f"canaries={canaries!r}: a whole number >= 1 (0 means no canaries: build none).")
    src = _private_sets(dataset, members, canaries)["nonmember_eval"]
    caps = src.captions
    kinds = [CANARY_KINDS[(i // 2) % len(CANARY_KINDS)] for i in range(len(src))]
    images, texts, ids = [], [], []
    for i, kind in enumerate(kinds):
        x, cap = src.images[i], caps[i]
        if kind == "inverted":
            x = -x
        elif kind == "rotated":
            x = torch.rot90(x, 1, (-2, -1))
        elif kind == "caption-swap":
            other = [caps[(i + d) % len(caps)] for d in range(1, len(caps))]
            swapped = [c for c in other if c != cap]
            if not swapped:
                raise ConfigError(f"every canary source of {dataset!r} has the caption {cap!r}: no caption to swap.")
            cap = swapped[0]
        images.append(x)
        texts.append(cap)
        ids.append(f"canary-{kind}:{src.ids[i]}")
    return DigitSet(torch.stack(images).contiguous(), src.labels.clone(), ids, texts), kinds


def canary_draw(canaries: int, run: int) -> Dict[str, List[int]]:
    """Run ``run``'s member and non-member canaries (indices into :func:`canary_universe`): one of each pair each,
    by a seeded coin per pair; a member canary and its non-member sit at the same position and share a kind."""
    coins = torch.randint(0, 2, (canaries,), generator=torch.Generator().manual_seed(CANARY_SEED + run)).tolist()
    return {"member": [2 * j + c for j, c in enumerate(coins)],
            "nonmember": [2 * j + 1 - c for j, c in enumerate(coins)]}


def canary_rows(universe, kinds: Sequence[str], idx: Sequence[int]):
    """The training rows of the canaries ``idx``: each once, a ``duplicate`` twice."""
    rows = [i for i in idx for _ in range(2 if kinds[i] == "duplicate" else 1)]
    return universe.subset(rows)


def training_set(rc: Recipe, run: int, *, reference: Optional[int] = None):
    """What a LoRA trains on: run ``run``'s members (or reference ``reference``'s half of the pool), then, with
    canaries, its member canaries (a reference: its balanced half of the canary universe)."""
    pool, _ = audited_pool(rc.dataset, rc.members)
    if reference is None:
        train = pool.subset(run_draw(len(pool), rc.members, run)["member"])
    else:
        from smplora_plugin.audit.references import balanced_halves

        keep = balanced_halves(len(pool), rc.references, REFERENCE_SEED)
        train = pool.subset(np.flatnonzero(keep[reference]).tolist())
    if not rc.canaries:
        return train
    universe, kinds = canary_universe(rc.dataset, rc.members, rc.canaries)
    if reference is None:
        idx = canary_draw(rc.canaries, run)["member"]
    else:
        from smplora_plugin.audit.references import balanced_halves

        idx = np.flatnonzero(balanced_halves(len(universe), rc.references, REFERENCE_SEED + 1)[reference]).tolist()
    return _join(train, canary_rows(universe, kinds, idx))


def _new_model(cfg, base_sd, rank: int, seed: int):
    from smplora_plugin.demo.model import TinyLDM

    model = TinyLDM(cfg.data.model_config, seed=0)
    model.load_base_state_dict(base_sd)
    model.add_lora(rank, seed=seed)
    return model


# ---------------------------------------------------------------------------------------------
# training one LoRA


class TimestepChannels:
    """A feature plugin (``smplora_extract_features``): the default calibrated loss maps plus three constant
    channels that encode each sample's timestep (``u = t / T``, ``sin(pi u)``, ``cos(pi u)``), so the proxy
    attacker can weigh a loss gap by the noise level it was measured at, as LiRA's per-t statistics do.
    A frontier lever, measured before it moves into the library."""

    def __init__(self, num_train_timesteps: int):
        self.T = float(num_train_timesteps)

    @hookimpl(tryfirst=True)  # answers before the built-in default (the hook takes the first result)
    def smplora_extract_features(self, reg, pred, target, timesteps, reference):
        if timesteps is None:
            raise ConfigError("timestep features need reg.features(pred, target, timesteps, reference=...).")
        maps = DefaultFeatures().smplora_extract_features(reg=reg, pred=pred, target=target, reference=reference)
        u = timesteps.to(maps.device, torch.float32).view(-1, 1, 1, 1) / self.T
        enc = torch.cat([u, torch.sin(np.pi * u), torch.cos(np.pi * u)], 1)
        return torch.cat([maps, enc.expand(-1, -1, *maps.shape[-2:])], 1)


def _grid(cfg, spec: Mapping[str, Any]) -> int:
    lat = cfg.data.model_config.latent_size
    return max(1, lat * int(spec.get("grid", 32)) // 64)


def train_one(rc: Recipe, spec: Mapping[str, Any], members, defense, seed: int, cfg,
              base_sd, *, memo: Optional["ShardMemo"] = None) -> Tuple[Any, Dict[str, Any]]:
    """Train one LoRA per ``spec`` on ``members``; returns the model and facts (seconds, epsilon). ``memo``: where
    a ``shard_agg`` row keeps its shard LoRAs (none: they are trained and dropped)."""
    from smplora_plugin import PrivacyConfig, PrivacyRegularizer
    from smplora_plugin.demo.train import train_lora

    from .privacy_utility import train_dpsgd, train_floor, train_smp_dp

    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown row kind {kind!r}; choose one of {list(KINDS)}.")
    steps = max(1, int(round(rc.steps * spec.pop("steps_frac", 1.0))))
    model = _new_model(cfg, base_sd, rc.lora_rank, seed)
    torch.manual_seed(seed)
    t0 = time.time()
    facts: Dict[str, Any] = {"steps": 0 if kind == "untouched" else steps, "epsilon": None}
    grid = _grid(cfg, spec)
    spec.pop("grid", None)
    flip = bool(spec.pop("flip", False))
    if flip and kind not in ("plain", "smp", "mp", "robust", "dpsgd", "smp_dp", "distill", "shard_agg"):
        raise ConfigError(f"flip augmentation is not wired for row kind {kind!r}.")
    levers = {k: spec.pop(k) for k in ("caption_dropout", "privacy_draws") if k in spec}
    if levers and kind not in ("plain", "smp", "mp", "robust"):
        raise ConfigError(f"caption_dropout / privacy_draws are wired for plain and SMP rows, not {kind!r}.")
    if "hidden" in spec:
        spec["hidden"] = tuple(spec["hidden"])
    plugins = [TimestepChannels(cfg.data.model_config.num_train_timesteps)] if spec.pop("tfeat", False) else None
    if plugins and kind not in ("smp", "mp", "robust", "smp_dp"):
        raise ConfigError(f"timestep features need an SMP / MP row, not {kind!r}.")
    dp: Dict[str, Any] = {}
    if kind in ("dpsgd", "smp_dp"):
        missing = [k for k in ("noise", "clip") if k not in spec]
        if missing:
            raise ConfigError(f"row kind {kind!r} needs {missing} (sigma and the per-sample clip).")
        dp = {k: spec.pop(k) for k in ("noise", "clip")}
        if kind == "dpsgd" and "noise_mult" in spec:
            dp["noise_mult"] = spec.pop("noise_mult")
        if kind == "dpsgd" and spec:
            raise ConfigError(f"row kind 'dpsgd' does not take {sorted(spec)}; it takes noise, clip, noise_mult, "
                              "flip, steps_frac.")
    if kind == "dpsgd":
        facts["epsilon"] = train_dpsgd(model, members, steps=steps, lr=rc.lora_lr, bs=rc.batch_size, seed=seed,
                                       flip=flip, **dp)
    elif kind == "smp_dp":
        reg = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=grid, seed=seed, **spec),
                                 plugins=plugins, load_entry_points=False)
        facts["epsilon"], facts["final_loss"] = train_smp_dp(model, members, defense, steps=steps, lr=rc.lora_lr,
                                                             bs=rc.batch_size, seed=seed, reg=reg, flip=flip, **dp)
    elif kind == "distill":
        facts["final_loss"] = train_distilled(model, members, defense, rc=rc, cfg=cfg, base_sd=base_sd, seed=seed,
                                              steps=steps, flip=flip, **spec)
    elif kind == "shard_agg":
        facts.update(train_shard_aggregate(model, members, rc=rc, cfg=cfg, base_sd=base_sd, seed=seed, steps=steps,
                                           flip=flip, memo=memo, **spec))
    elif kind == "floor":
        train_floor(model, members, defense, steps=steps, lr=rc.lora_lr, bs=rc.batch_size, seed=seed)
    elif kind != "untouched":
        reg = None
        if kind == "robust":
            reg = PrivacyRegularizer(PrivacyConfig.preset("robust", feature_grid=grid, seed=seed, **spec),
                                     plugins=plugins, load_entry_points=False)
        elif kind in ("smp", "mp"):
            reg = PrivacyRegularizer(objective=kind, feature_grid=grid, seed=seed, plugins=plugins,
                                     load_entry_points=False, **spec)
        res = train_lora(model, members, steps=steps, lr=rc.lora_lr, batch_size=rc.batch_size, seed=seed, reg=reg,
                         nonmembers=defense, name=kind, progress=False, flip=flip, **levers)
        facts["final_loss"] = res.summary()["adaptation_loss_last"]
    facts["train_seconds"] = round(time.time() - t0, 1)
    model.requires_grad_(False)
    return model, facts


def train_distilled(model, members, defense, *, rc: Recipe, cfg, base_sd, seed: int, steps: int, flip: bool,
                    shards: int = 2, inputs: str = "members") -> float:
    """Distillation into ``model``'s LoRA; every LoRA at the row's steps, lr and batch size.

    ``inputs="members"``: ``shards`` plain teachers (seeds ``seed + 10007 s``) on the members dealt by content
    (:func:`benchmarks.distill.assign_shards`), the student on every member against
    :class:`~benchmarks.distill.ShardTargets`. ``inputs="holdout"``: one plain teacher on every member, the
    student on the defense's held-out images against that teacher's predictions (it never sees a member).
    Returns the student's mean distillation loss over its last 100 steps.
    """
    from smplora_plugin.demo.train import train_lora

    from .distill import ShardTargets, assign_shards, content_key

    def teacher(rows, s):
        t = _new_model(cfg, base_sd, rc.lora_rank, seed + 10_007 * (s + 1))
        train_lora(t, rows, steps=steps, lr=rc.lora_lr, batch_size=rc.batch_size, seed=seed + 10_007 * (s + 1),
                   name=f"teacher {s}", progress=False, flip=flip)
        t.requires_grad_(False)
        return t.predict

    if inputs == "holdout":
        if defense is None or len(defense) == 0:
            raise ConfigError("distillation on held-out inputs needs the defense's non-member images.")
        only = teacher(members, 0)
        student_rows, targets = defense, lambda idx, z, t, c: only(z, t, c).detach()
    elif inputs == "members":
        shard_of = assign_shards([content_key(x) for x in members.images], shards, seed)
        teachers = [teacher(members.subset([i for i, x in enumerate(shard_of) if x == s]), s) for s in range(shards)]
        student_rows, targets = members, ShardTargets(teachers, shard_of)
    else:
        raise ConfigError(f"distill inputs must be 'members' or 'holdout', got {inputs!r}.")
    res = train_lora(model, student_rows, steps=steps, lr=rc.lora_lr, batch_size=rc.batch_size, seed=seed,
                     name="student", progress=False, flip=flip, targets=targets)
    return res.summary()["adaptation_loss_last"]


class ShardMemo:
    """The cache entries (kind ``shard``) of one row run's shard LoRAs, keyed by the run's LoRA settings with the
    row's spec cut to what the shards depend on (so rows that differ only in how they aggregate share them)."""

    def __init__(self, cache: Cache, settings: Mapping[str, Any]):
        self.cache, self.settings = cache, dict(settings)

    def key(self, shard_spec: Mapping[str, Any], shard: int) -> str:
        return settings_key({**self.settings, "spec": dict(shard_spec), "shard": shard})

    def get(self, shard_spec: Mapping[str, Any], shard: int) -> Optional[Dict[str, torch.Tensor]]:
        key = self.key(shard_spec, shard)
        return self.cache.read("shard", key)[1] if self.cache.done("shard", key) else None

    def put(self, shard_spec: Mapping[str, Any], shard: int, state: Mapping[str, torch.Tensor],
            meta: Mapping[str, Any]) -> None:
        self.cache.write("shard", self.key(shard_spec, shard), dict(meta), state)


def shard_lora_spec(shards: int, *, flip: bool, steps: int) -> Dict[str, Any]:
    """What a ``shard_agg`` row's shard LoRAs depend on (their :class:`ShardMemo` spec)."""
    return {"kind": "shard", "shards": shards, "assign": "content-hash", "flip": flip, "steps": steps}


def train_shard_aggregate(model, members, *, rc: Recipe, cfg, base_sd, seed: int, steps: int, flip: bool,
                          shards: int, clip: Optional[float] = None, noise: float = 0.0,
                          memo: Optional[ShardMemo] = None) -> Dict[str, Any]:
    """Load into ``model``'s LoRA the aggregate of ``shards`` plain LoRAs (:mod:`benchmarks.shard_aggregate`),
    each trained on its shard (seeds ``seed + 10007 s``) at the row's steps, lr and batch size (at most the shard's
    size). Returns facts: the epsilon (one Gaussian release; ``None`` without noise), shard sizes and seconds."""
    from smplora_plugin.demo.train import train_lora

    from .distill import content_key
    from .shard_aggregate import aggregate, gaussian_epsilon, hash_shards, lora_deltas, to_lora_state

    if noise and clip is None:
        raise ConfigError("a noised shard aggregate needs a clip (the noise is scaled to it).")
    shard_of = hash_shards([content_key(x) for x in members.images], shards)
    shard_spec = shard_lora_spec(shards, flip=flip, steps=steps)
    deltas, sizes, seconds = [], [], 0.0
    for s in range(shards):
        rows = members.subset([i for i, x in enumerate(shard_of) if x == s])
        sizes.append(len(rows))
        state = memo.get(shard_spec, s) if memo is not None else None
        if state is None:
            t0 = time.time()
            t = _new_model(cfg, base_sd, rc.lora_rank, seed + 10_007 * (s + 1))
            train_lora(t, rows, steps=steps, lr=rc.lora_lr, batch_size=rc.batch_size, seed=seed + 10_007 * (s + 1),
                       name=f"shard {s}", progress=False, flip=flip)
            state, dt = t.lora_state_dict(), time.time() - t0
            seconds += dt
            if memo is not None:
                memo.put(shard_spec, s, state, {"shard": s, "size": len(rows), "train_seconds": round(dt, 1)})
        deltas.append(lora_deltas(state))
    mean, agg = aggregate(deltas, clip=clip, noise=noise, generator=torch.Generator().manual_seed(seed + 77_003))
    model.load_lora_state_dict(to_lora_state(mean, rc.lora_rank))
    return {"epsilon": gaussian_epsilon(noise), "shard_sizes": sizes, "shard_train_seconds": round(seconds, 1), **agg}


def ensure_lora(cache: Cache, rc: Recipe, spec: Mapping[str, Any], run: int, *, reference: Optional[int] = None,
                setup=None):
    """The trained LoRA (from the cache, or trained now and cached); returns (model, meta)."""
    cfg, base, _ = setup or _setup(rc.dataset)
    settings = lora_settings(rc, spec, run, reference=reference)
    key = settings_key(settings)
    _, defense = audited_pool(rc.dataset, rc.members)
    train = training_set(rc, run, reference=reference)
    seed = run if reference is None else 50_000 + reference
    base_sd = base.base_state_dict()
    if cache.done("lora", key):
        meta, state = cache.read("lora", key)
        model = _new_model(cfg, base_sd, rc.lora_rank, seed)
        if state:
            model.load_lora_state_dict(state)
        model.requires_grad_(False)
        return model, meta
    model, facts = train_one(rc, spec, train, defense, seed, cfg, base_sd, memo=ShardMemo(cache, settings))
    meta = {"settings": settings, "key": key, "trained_ids": list(train.ids), **facts}
    cache.write("lora", key, meta, model.lora_state_dict())
    return model, meta


# ---------------------------------------------------------------------------------------------
# auditing one run


class MemoTarget:
    """A reference target whose noise predictions are memoised per input row, on disk.

    Every run and row at one ``(data set, M)`` audits images of the same pool with the same noise
    draws (audit seed 0), so a reference's loss grid is the same whatever the run: most of an audit's
    time (LiRA/RMIA's reference grids) is computed once per reference and read back afterwards. A row's
    key is the SHA-1 of its noisy latent, timestep and condition rounded to float16 (a rounding that
    differs only costs a recomputation). New rows are written by :meth:`flush` as one more shard.
    """

    def __init__(self, inner: Any, folder: Path):
        from safetensors.torch import load_file

        self.inner, self.folder = inner, Path(folder)
        self.memo: Dict[bytes, torch.Tensor] = {}
        self.new: Dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        for shard in sorted(self.folder.glob("shard_*.safetensors")):
            t = load_file(str(shard))
            for k, v in zip(t["keys"], t["eps"]):
                self.memo[bytes(k.tolist())] = v
        self.num_train_timesteps = inner.num_train_timesteps
        self.alphas_cumprod = inner.alphas_cumprod
        self.prediction_type = getattr(inner, "prediction_type", "epsilon")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(images)

    def condition(self, captions: Any) -> Any:
        return self.inner.condition(captions)

    @staticmethod
    def _key(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> bytes:
        h = hashlib.sha1(z.half().numpy().tobytes())
        h.update(str(int(t)).encode())
        h.update(c.half().numpy().tobytes())
        return h.digest()

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Any, *, adapter: bool = True) -> torch.Tensor:
        if not adapter or not isinstance(cond, torch.Tensor):
            return self.inner.eps(z_t, t, cond, adapter=adapter)
        keys = [self._key(z_t[i].float(), t[i], cond[i].float()) for i in range(z_t.shape[0])]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            out = torch.as_tensor(self.inner.eps(z_t[todo], t[todo], cond[todo], adapter=True)).float().cpu()
            for j, i in enumerate(todo):
                self.memo[keys[i]] = self.new[keys[i]] = out[j].clone()
        self.hits += z_t.shape[0] - len(todo)
        self.misses += len(todo)
        return torch.stack([self.memo[k] for k in keys])

    def flush(self) -> None:
        if not self.new:
            return
        from safetensors.torch import save_file

        tensors = {"keys": torch.tensor([list(k) for k in self.new], dtype=torch.uint8),
                   "eps": torch.stack(list(self.new.values())).contiguous()}
        atomic_write(self.folder / f"shard_{os.getpid()}_{time.time_ns()}.safetensors",
                     lambda tmp: save_file(tensors, tmp))
        self.new = {}


def _references(cache: Cache, rc: Recipe, setup) -> Tuple[Any, List[MemoTarget]]:
    if not rc.references:
        return None, []
    from smplora_plugin.audit import References
    from smplora_plugin.demo.target import TinyLDMTarget

    pairs, memos = [], []
    for r in range(rc.references):
        model, meta = ensure_lora(cache, rc, {"kind": "plain"}, 0, reference=r, setup=setup)
        memos.append(MemoTarget(TinyLDMTarget(model), cache.path("refeps", meta["key"])))
        pairs.append((memos[-1], meta["trained_ids"]))
    return References.from_targets(pairs, mode="online"), memos


def _quality(rc: Recipe, model, clf, cfg, members, reference, seed: int) -> Dict[str, Any]:
    """The data set's sample quality (``classifier_accuracy``: the share of samples the classifier puts in the
    intended class or style), with the run's non-members as the Fréchet reference."""
    ds = cfg.data
    if hasattr(ds, "sample_quality"):  # data sets with their own utility (emoji: style shares)
        return ds.sample_quality(model, clf, members, reference, per_label=rc.per_label, steps=rc.sample_steps,
                                 guidance=1.0, seed=seed)
    from smplora_plugin.demo.quality import sample_quality

    return sample_quality(model, clf, reference, per_label=rc.per_label, steps=rc.sample_steps, seed=seed,
                          captioner=ds.captioner)


def audit_with_canaries(target: Any, parts: Mapping[str, Any], canary_members: Any, canary_nonmembers: Any, *,
                        attacks: Optional[Sequence[str]], config: Mapping[str, Any], references: Any = None):
    """One audit of a run's population and its canaries: ``(report, canary scores, canary labels)``.

    ``parts``: the population's ``member_cal`` / ``member_eval`` / ``nonmember_cal`` / ``nonmember_eval``
    :class:`~smplora_plugin.audit.AuditSamples`. The canaries join the evaluation sides of one score context
    (the same noise draws, calibration fits and references), so each attack scores them as evaluation samples;
    the returned report is then assembled from the population's evaluation samples alone, as
    :func:`~smplora_plugin.audit.run_audit` on the population would (verdict, attack metrics, held-out loss), and
    the canaries' scores come back per attack, ``(n_canaries,)`` with labels 1 / 0 (members first). Built from
    the steps of ``run_audit`` (``smplora_plugin.audit.protocol``); tests/test_frontier.py checks the report
    against ``run_audit``'s on the population.
    """
    import copy

    from smplora_plugin.audit import metrics as M
    from smplora_plugin.audit import protocol as P
    from smplora_plugin.audit.types import AuditSamples

    cm, cn = len(canary_members), len(canary_nonmembers)
    if not cm or not cn:
        raise ConfigError("audit_with_canaries needs member and non-member canaries (without them: run_audit).")
    plan = P._plan(target, AuditSamples.concat([parts["member_eval"], canary_members]),
                   AuditSamples.concat([parts["nonmember_eval"], canary_nonmembers]),
                   calibration_members=parts["member_cal"], calibration_nonmembers=parts["nonmember_cal"],
                   calibration_fraction=0.5, attacks=attacks, config=dict(config), manifest_sets=None,
                   load_plugins=False, num_threads=1, n_permutations=1000, references=references)
    start = len(plan.parts["member_calibration"]) + len(plan.parts["nonmember_calibration"])
    nm, nn = len(parts["member_eval"]), len(parts["nonmember_eval"])
    pop = np.r_[start:start + nm, start + nm + cm:start + nm + cm + nn]
    can = np.r_[start + nm:start + nm + cm, start + nm + cm + nn:start + nm + cm + nn + cn]
    t0 = time.time()
    outs = []
    with P.cpu_settings(plan.threads):
        ctx = plan.context(target, False)
        for attack in plan.attacks:
            ta = time.time()
            outs.append((attack, attack.run(ctx, plan.cal_index, plan.labels[plan.cal_index]), time.time() - ta))
    view = copy.copy(plan)  # the population's plan: its evaluation samples only
    view.parts = {**plan.parts, "member_eval": plan.parts["member_eval"].subset(range(nm)),
                  "nonmember_eval": plan.parts["nonmember_eval"].subset(range(nn))}
    view.sets = P._manifest_sets(view.parts, None)
    view.eval_index = pop
    scored = P._Scored({}, {}, {})
    lab = plan.labels[pop]
    canary_scores: Dict[str, np.ndarray] = {}
    for attack, out, seconds in outs:
        scored.results[attack.name] = {**P._score_attack(attack, out, plan.labels, pop, plan.config),
                                       "seconds": round(seconds, 2)}
        scored.kept[attack.name] = P._kept_scores(attack, out, plan.labels, pop)
        ev = np.asarray(out.scores, dtype=np.float64)
        fpr, tpr, _ = M.roc_curve(ev[pop][lab == 1], ev[pop][lab == 0])
        scored.roc[attack.name] = (fpr.tolist(), tpr.tolist())
        canary_scores[attack.name] = ev[can].copy()
    report = P._assemble(view, ctx, scored, title="Membership-inference audit", utility=None, info=None, t0=t0)
    return report, canary_scores, plan.labels[can].copy()


def ensure_audit(cache: Cache, rc: Recipe, row: str, run: int, setup=None) -> Dict[str, Any]:
    """Run ``run`` of ``row``: train (or load) its LoRA, audit it and measure utility; cached."""
    spec = row_spec(row)
    key = settings_key(audit_settings(rc, spec, run))
    if cache.done("audit", key):
        return cache.read("audit", key)[0]
    from smplora_plugin.audit import AuditSamples, run_audit
    from smplora_plugin.demo.target import TinyLDMTarget

    setup = setup or _setup(rc.dataset)
    cfg, _, clf = setup
    torch.set_flush_denormal(True)
    model, lmeta = ensure_lora(cache, rc, spec, run, setup=setup)
    refs, memos = _references(cache, rc, setup)
    pool, _ = audited_pool(rc.dataset, rc.members)
    draw = run_draw(len(pool), rc.members, run, rc.audited)
    s = lambda part: AuditSamples(pool.subset(draw[part]).images, pool.subset(draw[part]).captions,  # noqa: E731
                                  pool.subset(draw[part]).ids)
    t0 = time.time()
    canary_meta: Optional[Dict[str, Any]] = None
    if not rc.canaries:
        report = run_audit(TinyLDMTarget(model), s("member_eval"), s("nonmember_eval"),
                           calibration_members=s("member_cal"), calibration_nonmembers=s("nonmember_cal"),
                           attacks=None if rc.attacks is None else list(rc.attacks), config={"seed": 0, **rc.audit},
                           progress=False, num_threads=1, references=refs, load_plugins=False)
    else:
        universe, kinds = canary_universe(rc.dataset, rc.members, rc.canaries)
        cd = canary_draw(rc.canaries, run)
        c = lambda idx: AuditSamples(universe.subset(idx).images, universe.subset(idx).captions,  # noqa: E731
                                     universe.subset(idx).ids)
        report, canary_scores, canary_labels = audit_with_canaries(
            TinyLDMTarget(model), {k: s(k) for k in ("member_cal", "member_eval", "nonmember_cal", "nonmember_eval")},
            c(cd["member"]), c(cd["nonmember"]), attacks=None if rc.attacks is None else list(rc.attacks),
            config={"seed": 0, **rc.audit}, references=refs)
        canary_meta = {"ids": [universe.ids[i] for i in cd["member"] + cd["nonmember"]],
                       "kinds": [kinds[i] for i in cd["member"] + cd["nonmember"]],
                       "labels": canary_labels.astype(int).tolist()}
    audit_s = time.time() - t0
    for m in memos:
        m.flush()
    nonmembers = pool.subset(draw["nonmember_cal"] + draw["nonmember_eval"])
    quality = _quality(rc, model, clf, cfg, pool.subset(draw["member"]), nonmembers, run)
    tensors: Dict[str, Any] = {"eval_labels": torch.as_tensor(report.eval_labels.astype(np.int64))}
    for a, sc in report.scores.items():
        tensors[f"{a}.eval"] = torch.as_tensor(sc.eval_scores, dtype=torch.float64)
        tensors[f"{a}.cal"] = torch.as_tensor(sc.cal_scores, dtype=torch.float64)
        tensors[f"{a}.cal_labels"] = torch.as_tensor(np.asarray(sc.cal_labels).astype(np.int64))
        if canary_meta is not None:
            tensors[f"{a}.canary"] = torch.as_tensor(canary_scores[a], dtype=torch.float64)
    if canary_meta is not None:
        tensors["canary_labels"] = torch.as_tensor(canary_labels.astype(np.int64))
    meta = {"row": row, "run": run, "dataset": rc.dataset, "members": rc.members, "key": key,
            "reference_eps_memo": {"hits": sum(m.hits for m in memos), "misses": sum(m.misses for m in memos)},
            "lora_key": lmeta["key"], "train": {k: lmeta.get(k) for k in ("steps", "epsilon", "train_seconds",
                                                                          "final_loss")},
            "audit_seconds": round(audit_s, 1), "quality": quality,
            "heldout_loss": report.utility.get("heldout_denoising_loss"),
            "member_loss": report.utility.get("member_denoising_loss"),
            "uses_model": {a: bool(sc.uses_model) for a, sc in report.scores.items()},
            "report": report.to_dict()}
    if canary_meta is not None:
        meta["canaries"] = canary_meta
    cache.write("audit", key, meta, tensors)
    return meta


def load_report(cache: Cache, key: str):
    """A cached run rebuilt as an :class:`AuditReport` with its scores (what pooling needs)."""
    from smplora_plugin.audit.protocol import AuditReport
    from smplora_plugin.audit.verdict import AttackScores

    meta, t = cache.read("audit", key)
    d = meta["report"]
    scores = {a: AttackScores(t[f"{a}.eval"].numpy(), t[f"{a}.cal"].numpy(), t[f"{a}.cal_labels"].numpy(),
                              uses_model=meta["uses_model"][a]) for a in meta["uses_model"]}
    n = max(1, sum(d["splits"].values()))
    rep = AuditReport(title=d["title"], attacks=d["attacks"], max_over_attacks=d["max_over_attacks"],
                      utility=d["utility"], splits=d["splits"], null_band=tuple(d["null_band_auc95"]),
                      config=d["config"], timesteps=d["timesteps"],
                      passes={k: int(round(v * n)) for k, v in d["model_passes_per_sample"].items()}, info=d["info"],
                      seconds=d["seconds"], manifest=None, roc={}, verdict=d["verdict"], scores=scores,
                      eval_labels=t["eval_labels"].numpy())
    return rep, meta


def load_canary_report(cache: Cache, key: str):
    """A cached run's canaries as an :class:`AuditReport` for pooling: evaluation scores and labels the canaries',
    calibration scores the run's population calibration (the same standardisation as the population's)."""
    import dataclasses

    from smplora_plugin.audit import metrics as M
    from smplora_plugin.audit.verdict import AttackScores

    rep, meta = load_report(cache, key)
    if "canaries" not in meta:
        raise ConfigError(f"the cached run {key} has no canaries: audit it with a recipe with canaries > 0.")
    _, t = cache.read("audit", key)
    labels = t["canary_labels"].numpy()
    scores = {a: AttackScores(t[f"{a}.canary"].numpy(), sc.cal_scores, sc.cal_labels, uses_model=sc.uses_model)
              for a, sc in rep.scores.items()}
    attacks = {a: {"title": rep.attacks[a].get("title", a),
                   "auc": M.auc(sc.eval_scores[labels == 1], sc.eval_scores[labels == 0])} for a, sc in scores.items()}
    splits = {"canary_member": int(labels.sum()), "canary_nonmember": int((labels == 0).sum())}
    return dataclasses.replace(rep, scores=scores, eval_labels=labels, attacks=attacks, verdict={},
                               splits=splits), meta


# ---------------------------------------------------------------------------------------------
# one point: pooled over its runs


def pooled_report(cache: Cache, rc: Recipe, row: str):
    """``(pooled AuditReport, per-run metas)`` of ``row`` when all ``rc.runs`` runs are cached; ``None`` otherwise."""
    from smplora_plugin.audit.engine import AuditConfig
    from smplora_plugin.audit.pooled import pool_reports

    spec = row_spec(row)
    keys = [settings_key(audit_settings(rc, spec, i)) for i in range(rc.runs)]
    if not all(cache.done("audit", k) for k in keys):
        return None
    loaded = [load_report(cache, k) for k in keys]
    reports, metas = [r for r, _ in loaded], [m for _, m in loaded]
    cfg = AuditConfig.from_dict({"seed": 0, **rc.audit})
    return pool_reports(reports, [f"run {i}" for i in range(rc.runs)], config=cfg, title=row), metas


def pooled_canary_report(cache: Cache, rc: Recipe, row: str):
    """The canaries of ``row`` pooled over its ``rc.runs`` runs (``None`` until all are cached, or without canaries):
    ``(pooled AuditReport, per-run canary kinds in pooled order)``."""
    from smplora_plugin.audit.engine import AuditConfig
    from smplora_plugin.audit.pooled import pool_reports

    if not rc.canaries:
        return None
    spec = row_spec(row)
    keys = [settings_key(audit_settings(rc, spec, i)) for i in range(rc.runs)]
    if not all(cache.done("audit", k) for k in keys):
        return None
    loaded = [load_canary_report(cache, k) for k in keys]
    cfg = AuditConfig.from_dict({"seed": 0, **rc.audit})
    pooled = pool_reports([r for r, _ in loaded], [f"run {i}" for i in range(rc.runs)], config=cfg,
                          title=f"{row}: canaries")
    return pooled, [k for _, m in loaded for k in m["canaries"]["kinds"]]


def canary_fields(pooled, kinds: Sequence[str], baseline=None) -> Dict[str, Any]:
    """The canaries' pooled figures: headline and envelope AUC, TPR@1%FPR, AUC per kind (the headline attack's),
    and with ``baseline`` (the untouched model's pooled canaries) the paired test."""
    from smplora_plugin.audit import metrics as M

    v = pooled.verdict
    h = v["headline"]["attack"]
    model_attacks = {a: r for a, r in pooled.attacks.items() if r.get("uses_model", True)}
    env1 = max(model_attacks, key=lambda a: model_attacks[a].get("tpr_at_1pct_fpr") or 0.0)
    lab = np.asarray(pooled.eval_labels).astype(int)
    sc = pooled.scores[h].eval_scores
    ks = np.asarray(kinds)
    per_kind = {k: M.auc(sc[(ks == k) & (lab == 1)], sc[(ks == k) & (lab == 0)])
                for k in CANARY_KINDS if ((ks == k) & (lab == 1)).any() and ((ks == k) & (lab == 0)).any()}
    out = {"canary_n_member": int(lab.sum()), "canary_n_nonmember": int((lab == 0).sum()),
           "canary_verdict": v["verdict"], "canary_headline_attack": h, "canary_headline_auc": v["headline"]["auc"],
           "canary_headline_tpr_1pct": pooled.attacks[h].get("tpr_at_1pct_fpr"),
           "canary_envelope_auc": v["upper_envelope"]["auc"]["value"],
           "canary_envelope_auc_attack": v["upper_envelope"]["auc"]["attack"],
           "canary_envelope_tpr_1pct": model_attacks[env1].get("tpr_at_1pct_fpr"),
           "canary_envelope_tpr_1pct_attack": env1,
           "canary_per_attack_auc": {a: r["auc"] for a, r in pooled.attacks.items()},
           "canary_kind_auc": per_kind}
    if baseline is not None:
        out.update({f"canary_{k}": x for k, x in paired_fields(pooled, baseline).items()})
    return out


def paired_fields(pooled, baseline) -> Dict[str, Any]:
    """The row against the untouched model on the same draws
    (:func:`~smplora_plugin.audit.paired.compare_to_baseline`)."""
    from smplora_plugin.audit.paired import compare_to_baseline

    c = compare_to_baseline(pooled, baseline)
    if c.get("envelope") is None:
        return {"paired_verdict": c["verdict"], "paired_p": None, "paired_attack": None, "paired_difference": None}
    return {"paired_verdict": c["verdict"], "paired_p": min(c["p_values"]["headline"], c["p_values"]["envelope"]),
            "paired_p_headline": c["p_values"]["headline"], "paired_p_envelope": c["p_values"]["envelope"],
            "paired_attack": c["envelope"]["attack"], "paired_difference": c["envelope"]["difference"],
            "paired_headline_difference": c["headline"]["difference"]}


def pooled_point(cache: Cache, rc: Recipe, row: str, baseline=None,
                 canary_baseline=None) -> Optional[Dict[str, Any]]:
    """The pooled row of ``row`` when all ``rc.runs`` runs are cached; ``None`` otherwise.

    ``baseline``: the untouched model's pooled report at the same recipe; adds the paired verdict.
    With canaries (``rc.canaries``) the point also holds the canaries' figures (:func:`canary_fields`);
    ``canary_baseline``: the untouched model's pooled canary report, for their paired test.
    """
    got = pooled_report(cache, rc, row)
    if got is None:
        return None
    pooled, metas = got
    spec = row_spec(row)
    v = pooled.verdict
    h = v["headline"]
    head = pooled.attacks[h["attack"]]
    model_attacks = {a: r for a, r in pooled.attacks.items() if r.get("uses_model", True)}
    env01 = max(model_attacks, key=lambda a: model_attacks[a].get("tpr_at_0.1pct_fpr") or 0.0)
    env1 = max(model_attacks, key=lambda a: model_attacks[a].get("tpr_at_1pct_fpr") or 0.0)
    mean = lambda xs: None if not xs or any(x is None for x in xs) else float(statistics.mean(xs))  # noqa: E731
    sd = lambda xs: None if len(xs) < 2 or any(x is None for x in xs) else float(statistics.stdev(xs))  # noqa: E731
    acc = [m["quality"]["classifier_accuracy"] for m in metas]
    return {
        "dataset": rc.dataset, "members": rc.members, "row": row, "family": ROWS[row][0], "spec": spec,
        "runs": rc.runs, "references": rc.references, "steps": metas[0]["train"]["steps"],
        "epochs": round(metas[0]["train"]["steps"] * min(rc.batch_size, rc.members) / rc.members, 1),
        "verdict": v["verdict"], "headline_attack": h["attack"], "headline_auc": h["auc"],
        "headline_auc_ci95": h["auc_ci95"], "headline_p": h["p_value"],
        "headline_tpr_1pct": head.get("tpr_at_1pct_fpr"), "headline_tpr_01pct": head.get("tpr_at_0.1pct_fpr"),
        "envelope_auc": v["upper_envelope"]["auc"]["value"],
        "envelope_auc_attack": v["upper_envelope"]["auc"]["attack"],
        "envelope_auc_p": v["upper_envelope"]["auc"]["p_value"],
        "envelope_tpr_01pct": model_attacks[env01].get("tpr_at_0.1pct_fpr"), "envelope_tpr_01pct_attack": env01,
        "envelope_tpr_1pct": model_attacks[env1].get("tpr_at_1pct_fpr"), "envelope_tpr_1pct_attack": env1,
        "epsilon_lower_bound": v["epsilon_lower_bound"]["epsilon"],
        "per_attack_auc": {a: r["auc"] for a, r in pooled.attacks.items()},
        "n_member_eval": v["n_member"], "n_nonmember_eval": v["n_nonmember"],
        "classifier_accuracy": mean(acc), "classifier_accuracy_sd": sd(acc),
        "frechet_distance": mean([m["quality"]["frechet_distance"] for m in metas]),
        "heldout_loss": mean([m["heldout_loss"] for m in metas]),
        "member_loss": mean([m["member_loss"] for m in metas]),
        "dp_epsilon": None if metas[0]["train"]["epsilon"] is None else mean([m["train"]["epsilon"] for m in metas]),
        "train_seconds": mean([m["train"]["train_seconds"] for m in metas]),
        "audit_seconds": mean([m["audit_seconds"] for m in metas]),
        **(paired_fields(pooled, baseline) if baseline is not None and row != "untouched" else {}),
        **_canaries_of(cache, rc, row, canary_baseline),
    }


def _canaries_of(cache: Cache, rc: Recipe, row: str, canary_baseline) -> Dict[str, Any]:
    got = pooled_canary_report(cache, rc, row)
    if got is None:
        return {}
    base = canary_baseline if row != "untouched" else None
    return {"canaries": rc.canaries, **canary_fields(got[0], got[1], base)}


def add_gain(points: List[Dict[str, Any]]) -> None:
    """Per (data set, M, runs), against the untouched model and plain LoRA of the same runs.

    ``gain_kept``: share of plain LoRA's classifier-accuracy gain over the untouched model.
    ``fd_gain_kept``: share of plain LoRA's drop in Fréchet distance. A row can push the classifier's
    style share past plain's while its samples are further from the real style; this says so.
    Both are ``None`` (n/a) where plain LoRA did not improve the metric by at least 1% of the untouched
    value (digits' accuracy and Fréchet distance, textures' Fréchet distance): there is no gain to keep.
    """
    by = {(p["dataset"], p["members"], p["runs"], p.get("canaries", 0), p["row"]): p for p in points}
    for p in points:
        at = (p["dataset"], p["members"], p["runs"], p.get("canaries", 0))
        u, pl = by.get((*at, "untouched")), by.get((*at, "plain"))
        p["gain_kept"] = _share(p, u, pl, "classifier_accuracy", +1)
        p["fd_gain_kept"] = _share(p, u, pl, "frechet_distance", -1)


MIN_PLAIN_CHANGE = 0.01  # a share needs plain LoRA to improve the metric by at least 1% of the untouched value


def _share(p: Mapping[str, Any], u: Optional[Mapping[str, Any]], pl: Optional[Mapping[str, Any]],
           key: str, better: int) -> Optional[float]:
    """``better``: +1 where higher is better (accuracy), -1 where lower is (Fréchet distance)."""
    if not (u and pl) or any(x.get(key) is None for x in (p, u, pl)):
        return None
    if better * (pl[key] - u[key]) <= MIN_PLAIN_CHANGE * max(abs(u[key]), 1e-9):  # plain gained nothing to keep
        return None
    return (p[key] - u[key]) / (pl[key] - u[key])


def most_runs(points: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (data set, M, canaries, row) the point pooled over the most runs (its runs include the smaller point's)."""
    best: Dict[Tuple[str, int, int, str], Dict[str, Any]] = {}
    key = lambda p: (p["dataset"], p["members"], p.get("canaries", 0), p["row"])  # noqa: E731
    for p in points:
        k = key(p)
        if k not in best or p["runs"] > best[k]["runs"]:
            best[k] = p
    return [p for p in points if best[key(p)] is p]


def pareto(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates (utility ``x`` higher, privacy ``y`` lower), by ``x``.

    A point is dominated when another has ``x >=`` and ``y <=`` with at least one strict; exact
    duplicates keep the first.
    """
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 <= y and (x2 > x or y2 < y)) or ((x2, y2) == (x, y) and j < i)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


# ---------------------------------------------------------------------------------------------
# scheduling


def tasks_for(cache: Cache, rc: Recipe, rows: Sequence[str]) -> List[Dict[str, Any]]:
    """What is not cached yet: references first, then each row's runs (a point completes before the next)."""
    out: List[Dict[str, Any]] = []
    for r in range(rc.references):
        if not cache.done("lora", settings_key(lora_settings(rc, {"kind": "plain"}, 0, reference=r))):
            out.append({"task": "reference", "index": r})
    for row in rows:
        spec = row_spec(row)
        for i in range(rc.runs):
            if not cache.done("audit", settings_key(audit_settings(rc, spec, i))):
                out.append({"task": "run", "row": row, "run": i})
    return out


def execute(task: Mapping[str, Any], cache: Cache, rc: Recipe) -> Dict[str, Any]:
    """One task (a reference LoRA, or one run of a row): trained / audited into the cache; returns its facts."""
    setup = _setup(rc.dataset)
    if task["task"] == "reference":
        _, meta = ensure_lora(cache, rc, {"kind": "plain"}, 0, reference=int(task["index"]), setup=setup)
        return {"task": "reference", "index": task["index"], "train_seconds": meta.get("train_seconds")}
    meta = ensure_audit(cache, rc, task["row"], int(task["run"]), setup=setup)
    rep = meta["report"]["verdict"]
    return {"task": "run", "row": task["row"], "run": task["run"], "verdict": rep["verdict"],
            "headline": rep["headline"]["attack"], "headline_auc": rep["headline"]["auc"],
            "accuracy": meta["quality"]["classifier_accuracy"], "train_seconds": meta["train"]["train_seconds"],
            "audit_seconds": meta["audit_seconds"]}


def _worker_execute(task: Mapping[str, Any], root: str, rc: Recipe) -> Dict[str, Any]:
    return execute(task, Cache(Path(root)), rc)


def schedule(cache: Cache, rc: Recipe, rows: Sequence[str], jobs: int, nice: int = 19, log=print,
             deadline: Optional[float] = None) -> int:
    """Run the missing tasks in ``jobs`` spawned worker processes (:func:`~benchmarks._common.run_in_workers`:
    one torch thread, niced by ``nice``, a fresh process per task), every reference before any run; a task's
    result is its cache entry. Starts no process when nothing is missing. Returns the number of failed tasks."""
    todo = tasks_for(cache, rc, rows)
    failures = 0
    for phase in ("reference", "run"):
        tasks = [(t, str(cache.root), rc) for t in todo if t["task"] == phase]
        for (t, _, _), result, error in run_in_workers(_worker_execute, tasks, jobs=jobs, nice=nice,
                                                       deadline=deadline):
            if error is None:
                log(f"{rc.dataset} M={rc.members}: {json.dumps(result)}")
            else:
                failures += 1
                log(f"FAILED {t}: {error!r}{error.__cause__ or ''}")  # __cause__: the worker's traceback
    return failures


# ---------------------------------------------------------------------------------------------
# report: table, figure, RESULTS.md


def _env_tpr(p: Mapping[str, Any]) -> str:
    # None: too few pooled non-members to resolve 1% FPR
    if p.get("envelope_tpr_1pct") is None:
        return "n/a"
    return f"{pct(p['envelope_tpr_1pct'])} ({p['envelope_tpr_1pct_attack']})"


def _fd(p: Mapping[str, Any]) -> str:
    if p.get("frechet_distance") is None:
        return "n/a"
    return f"{p['frechet_distance']:.1f} ({pct(p.get('fd_gain_kept'))})"


def _eps(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0f}"


def _canary_cells(p: Mapping[str, Any]) -> str:
    """The canary columns of one point: pooled member canaries, headline AUC, envelope AUC, envelope TPR@1%FPR,
    the paired test against the untouched model's canaries."""
    if "canary_headline_auc" not in p:
        return "— | — | — | — | — |"
    tpr = p.get("canary_envelope_tpr_1pct")
    tpr_text = "n/a" if tpr is None else f"{pct(tpr)} ({p['canary_envelope_tpr_1pct_attack']})"
    paired = _paired({k[len("canary_"):]: v for k, v in p.items() if k.startswith("canary_paired")})
    return (f"{p['canary_n_member']} | {p['canary_headline_auc']:.3f} ({p['canary_headline_attack']}) | "
            f"{p['canary_envelope_auc']:.3f} ({p['canary_envelope_auc_attack']}) | {tpr_text} | {paired} |")


def table(points: List[Dict[str, Any]]) -> str:
    """The Markdown table of the points; with canary columns when any point has canaries."""
    canaries = any("canary_headline_auc" in p for p in points)
    head = ("| M | row | runs | epochs | verdict | headline attack | headline AUC [95% CI] | TPR@1%FPR | "
            "TPR@0.1%FPR | envelope AUC (attack) | envelope TPR@1%FPR (attack) | envelope TPR@0.1%FPR | "
            "vs untouched, paired: largest AUC gain (attack, p) | "
            "classifier acc. | gain kept | Fréchet distance (drop kept) | held-out loss | DP epsilon |")
    if canaries:
        head += (" canaries (members pooled) | canary headline AUC (attack) | canary envelope AUC (attack) | "
                 "canary envelope TPR@1%FPR (attack) | canaries vs untouched's, paired |")
    lines = [head, "|" + "---|" * (18 + 5 * canaries)]
    for p in points:
        lo, hi = p["headline_auc_ci95"]
        lines.append(
            f"| {p['members']} | {p['row']}{' (+ canaries)' if p.get('canaries') else ''} | {p['runs']} | "
            f"{p['epochs']:g} | {p['verdict']} | {p['headline_attack']} | "
            f"{p['headline_auc']:.3f} [{lo:.2f}, {hi:.2f}] | {pct(p['headline_tpr_1pct'])} | "
            f"{pct(p['headline_tpr_01pct'])} | {p['envelope_auc']:.3f} ({p['envelope_auc_attack']}) | "
            f"{_env_tpr(p)} | {pct(p['envelope_tpr_01pct'])} | {_paired(p)} | "
            f"{fmt(p['classifier_accuracy'])} ± {fmt(p['classifier_accuracy_sd'])} | "
            f"{pct(p.get('gain_kept'))} | {_fd(p)} | {fmt(p['heldout_loss'], 4)} | "
            f"{_eps(p['dp_epsilon'])} |" + (f" {_canary_cells(p)}" if canaries else ""))
    return "\n".join(lines) + "\n"


def _paired(p: Mapping[str, Any]) -> str:
    if "paired_verdict" not in p:
        return "—"
    word = "**beyond**" if p["paired_verdict"].startswith("leaks") else "not beyond"
    if p.get("paired_difference") is None:
        return word
    pv = p["paired_p"]
    p_text = "< 0.001" if pv < 0.001 else f"= {pv:.3f}"
    return f"{word}: {p['paired_difference']:+.3f} ({p['paired_attack']}, p {p_text})"


def plot(points: List[Dict[str, Any]], path: Path) -> None:
    """One panel per data set: pooled headline AUC against classifier accuracy; each family's Pareto points joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p["dataset"] for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets) + 2.6, 5.0), squeeze=False)
    colors = dict(zip(FAMILY_ORDER, plt.get_cmap("tab10").colors))
    markers = {32: "o", 64: "s", 128: "^", 256: "D", 512: "v"}
    handles: Dict[str, Any] = {}
    for ax, ds in zip(axes[0], datasets):
        for fam in FAMILY_ORDER:
            groups = sorted({(p["members"], p.get("canaries", 0)) for p in points if p["dataset"] == ds})
            for m, nc in groups:  # a recipe with canaries trains on more: its own line (dashed, hollow markers)
                ps = [p for p in points if p["dataset"] == ds and p["family"] == fam and p["members"] == m
                      and p.get("canaries", 0) == nc]
                if not ps:
                    continue
                xy = [(p["classifier_accuracy"], p["headline_auc"]) for p in ps]
                sc = ax.scatter([x for x, _ in xy], [y for _, y in xy], marker=markers.get(m, "P"), s=36, zorder=3,
                                **({"facecolors": "none", "edgecolors": colors[fam]} if nc else {"color": colors[fam]}))
                front = pareto(xy)
                ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color=colors[fam], lw=1.2, zorder=2,
                        ls="--" if nc else "-")
                handles.setdefault(fam, sc)
                handles.setdefault(f"M = {m}", plt.Line2D([], [], color="k", marker=markers.get(m, "P"), ls=""))
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(ds)
        ax.set_xlabel(("share of generated samples in the LoRA's style" if ds == "emoji" else
                       "classifier accuracy on generated samples") + " (higher = more useful)")
        ax.set_ylabel("pooled headline AUC (lower = more private)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Privacy-utility frontier, audit v2 (each point pooled over its runs; Pareto points joined)")
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (6.2 * len(datasets) + 2.6), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def _recipe(args) -> Recipe:
    from smplora_plugin.demo.pipeline import DemoConfig

    if args.steps and args.epochs:
        raise SystemExit("give --steps or --epochs, not both.")
    batch = Recipe.__dataclass_fields__["batch_size"].default
    if args.epochs:  # passes over the members: steps = epochs * M / batch (at least one step)
        steps = max(1, -(-args.epochs * args.members // min(batch, args.members)))
    else:
        steps = args.steps or DemoConfig(dataset=args.dataset).steps
    audit = {"n_boot": 200, **json.loads(args.audit_json)}
    rc = Recipe(dataset=args.dataset, members=args.members, steps=steps, runs=args.runs, references=args.references,
                audit=audit, attacks=None if not args.attacks else tuple(args.attacks.split(",")),
                per_label=args.per_label, sample_steps=args.sample_steps, audited=args.audited,
                canaries=args.canaries)
    rc.validate()
    return rc


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="textures")
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="LoRA steps (0: the demo's for the data set)")
    p.add_argument("--epochs", type=int, default=0, help="instead of --steps: passes over the members (batch 32)")
    p.add_argument("--runs", type=int, default=8, help="independently trained LoRAs pooled per point")
    p.add_argument("--references", type=int, default=8, help="plain reference LoRAs per (data set, M); 0: none")
    p.add_argument("--audit-json", default="{}", help="audit config overrides (JSON), on top of n_boot 200")
    p.add_argument("--attacks", default="", help="comma-separated attacks (default: the whole suite)")
    p.add_argument("--per-label", type=int, default=20, help="generated samples per class for utility")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--audited", type=int, default=128,
                   help="audit at most this many members (and non-members) per run; the LoRA trains on all")
    p.add_argument("--canaries", type=int, nargs="?", const=8, default=0,
                   help="canaries per run (issue 23; bare --canaries: 8): member canaries trained on besides the "
                        "members, as many non-member canaries, audited with them; a recipe of its own (its LoRAs, "
                        "references and audits are cached apart). Default 0: none, the runs cached before")
    p.add_argument("--rows", default="untouched,plain,robust")
    p.add_argument("--cache", default=str(default_cache()),
                   help="cache folder (default: $SMPLORA_FRONTIER_CACHE, else $XDG_CACHE_HOME/smplora/frontier)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run", help="train and audit the missing runs of the given rows")
    _common(pr)
    pr.add_argument("--jobs", type=int, default=2, help="worker processes at a time (one torch thread each)")
    pr.add_argument("--nice", type=int, default=19, help="niceness added to every worker")
    pr.add_argument("--stop-at", default="", help="HH:MM (machine clock): start no new job after it")
    pp = sub.add_parser("report", help="pool every finished point of the given frontiers; print / write")
    pp.add_argument("--frontier", action="append", default=[],
                    help="DATASET:M:ROWS[:STEPS[:RUNS[:CANARIES]]] (repeatable; STEPS 0: from --epochs; CANARIES: "
                         "per run, default --canaries); the other recipe settings from the options below. A row "
                         "given at several run counts is reported at the most")
    _common(pp)
    pp.add_argument("--out-rows", default=str(ROWS_JSONL))
    pp.add_argument("--png", default=str(PNG))
    pp.add_argument("--write", action="store_true", help="write RESULTS.md's section, the PNG and the rows jsonl")
    pp.add_argument("--section", default="frontier_v2",
                    help="RESULTS.md section --write replaces (another name: a section of its own, e.g. for the "
                         "canary recipe, so that the tables of runs not in this cache stay)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "run" and args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: use 1 or more")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    cache = Cache(Path(args.cache))
    if args.cmd == "run":
        rc = _recipe(args)
        deadline = None
        if args.stop_at:
            hh, mm = (int(x) for x in args.stop_at.split(":"))
            now = time.localtime()
            deadline = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, 0, 0, 0, -1))
        return 1 if schedule(cache, rc, rows, args.jobs, args.nice, deadline=deadline) else 0
    frontiers = args.frontier or [f"{args.dataset}:{args.members}:{args.rows}"]
    points: List[Dict[str, Any]] = []
    missing: List[str] = []
    for fr in frontiers:
        parts = fr.split(":")
        steps = int(parts[3]) if len(parts) > 3 and parts[3] else 0
        ns = argparse.Namespace(**{**vars(args), "dataset": parts[0], "members": int(parts[1]),
                                   "steps": steps or args.steps, "epochs": 0 if steps else args.epochs,
                                   "runs": int(parts[4]) if len(parts) > 4 else args.runs,
                                   "canaries": int(parts[5]) if len(parts) > 5 else args.canaries})
        rc = _recipe(ns)
        base = pooled_report(cache, rc, "untouched")
        canary_base = pooled_canary_report(cache, rc, "untouched")
        for row in parts[2].split(","):
            p = pooled_point(cache, rc, row, baseline=None if base is None else base[0],
                             canary_baseline=None if canary_base is None else canary_base[0])
            if p is None:
                spec = row_spec(row)
                n = sum(cache.done("audit", settings_key(audit_settings(rc, spec, i))) for i in range(rc.runs))
                with_c = f" with {rc.canaries} canaries" if rc.canaries else ""
                missing.append(f"{rc.dataset} M={rc.members}{with_c} {row}: {n}/{rc.runs} runs")
            else:
                points.append(p)
    add_gain(points)
    points = most_runs(points)
    text = ""
    for ds in sorted({p["dataset"] for p in points}):
        text += f"\n### {ds}\n\n" + table([p for p in points if p["dataset"] == ds])
    if missing:
        text += "\nNot finished (not in the table or the figure): " + "; ".join(missing) + ".\n"
    print(text)
    if args.write and points:
        Path(args.out_rows).write_text("".join(json.dumps(p) + "\n" for p in points))
        figure = ""
        if len({p["family"] for p in points}) > 1:  # a single family is no frontier: no figure
            plot(points, Path(args.png))
            figure = f"\n![frontier]({Path(args.png).name})\n"
        cmd_note = "run: `python -m benchmarks.frontier run --dataset D --members M --rows ... --runs 8 --jobs 2`"
        title = ("Privacy-utility frontier, audit v2 (issue 11)" if args.section == "frontier_v2" else
                 f"Privacy-utility frontier: {args.section} (issue 23)")
        write_section(args.section, f"## {title}\n\n" + header() +
                      f"- {cmd_note}; the cache is outside the repository\n" + text + figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
