"""The demo's columns (one per variant, and the untouched base model): train, sample, audit, in this
process or in parallel worker processes.

A column is computed from the demo's settings and seed alone (base weights, LoRA initialisation,
member batches, timesteps, noise and the audit's draws are all seeded), so the columns give the same
numbers in any order and in any process: :func:`run_columns` with ``jobs=2`` runs them in two spawned
workers of the caller's torch thread count each, with the figures of ``jobs=1``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

BASE = "base"
#: the slowest columns first, so that two workers finish at about the same time (the base trains nothing)
SLOWEST_FIRST = ("smp-robust", "smp", "mp", "plain", BASE)
_REFERENCE = "private non-members (calibration + evaluation)"


@dataclass
class Shared:
    """What every column needs, built once by :func:`~.pipeline.run_demo` (sent once to each worker)."""

    cfg: Any  # DemoConfig
    splits: Any  # DigitSplits
    member_cal: Any
    member_eval: Any
    base_sd: Dict[str, torch.Tensor]
    classifier: Any
    references: Any  # References for LiRA / RMIA, or None
    base_source: str
    base_quality: Dict[str, Any]
    quality_reference: Any  # the audit's calibration + evaluation non-members
    feature_space: str


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(columns: int, threads: int = 1) -> int:
    """Worker processes for ``columns`` columns of ``threads`` torch threads each: one per free core."""
    return max(1, min(columns, available_cores() // max(1, threads)))


def columns_of(cfg: Any) -> List[str]:
    """The table's columns after the base model: the variants, then :data:`BASE` (audited last)."""
    return [*cfg.variants, BASE]


def run_column(sh: Shared, column: str, out: Path, *, progress: bool = False,
               log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train (not for :data:`BASE`), sample and audit one column. The report is returned unwritten: its
    held-out loss ratio to plain LoRA needs plain's column. Returns ``title``, ``report``, ``training``,
    ``lora_file`` and ``seconds``."""
    from ..audit import run_audit
    from .model import TinyLDM
    from .pipeline import BASE_TITLE, VARIANT_TITLES, _regularizer, _samples, _save_lora, _save_png
    from .quality import image_grid, sample_captions
    from .target import TinyLDMTarget
    from .train import train_lora

    cfg, ds = sh.cfg, sh.cfg.data
    seconds: Dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    flushed = torch.set_flush_denormal(True)  # denormals slow the tiny UNet ~10x on CPU
    try:
        model = TinyLDM(ds.model_config, seed=0)
        model.load_base_state_dict(sh.base_sd)
        model.add_lora(cfg.lora_rank, seed=cfg.seed)  # the base column's is never trained: B = 0, exactly the base
        run = lora_file = None
        if column == BASE:
            title = BASE_TITLE
            utility: Dict[str, Any] = {"sample_quality": {**sh.base_quality, "feature_space": sh.feature_space,
                                                          "reference": _REFERENCE}}
            info: Dict[str, Any] = {"note": "the untouched base model: a LoRA that was never trained (B = 0) is "
                                            "the identity"}
            log(f"Auditing the {BASE_TITLE} (the same targets, LoRA disabled: the floor) ...")
        else:
            title = VARIANT_TITLES[column]
            vdir = out / column
            vdir.mkdir(parents=True, exist_ok=True)
            reg = _regularizer(cfg, column)
            if not progress:
                log(f"Training {title} ...")
            t0 = time.time()
            run = train_lora(model, sh.splits["member"], steps=cfg.steps, lr=cfg.lora_lr, batch_size=cfg.batch_size,
                             seed=cfg.seed, reg=reg, nonmembers=sh.splits["nonmember_defense"], name=title,
                             progress=progress)
            seconds[f"train_{column}"] = round(time.time() - t0, 1)
            lora_file = str(_save_lora(model, reg, vdir, column, cfg))
            t0 = time.time()
            qargs = dict(per_label=cfg.samples_per_label, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
            quality = ds.sample_quality(model, sh.classifier, sh.splits["member"], sh.quality_reference, **qargs)
            grid = sample_captions(model, ds.grid_captions(sh.splits["member"], sh.quality_reference),
                                   steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
            _save_png(image_grid(grid, nrow=10), vdir / "samples.png")
            seconds[f"quality_{column}"] = round(time.time() - t0, 1)
            utility = {"sample_quality": {**quality, "feature_space": sh.feature_space, "reference": _REFERENCE},
                       "sample_quality_base_model": sh.base_quality}
            info = {"members_trained": cfg.members, "steps": cfg.steps, "batch_size": cfg.batch_size,
                    "steps_per_image": cfg.steps * min(cfg.batch_size, cfg.members) / cfg.members,
                    "lora_rank": cfg.lora_rank, "lora_lr": cfg.lora_lr,
                    "regularizer": None if reg is None else reg.config.to_dict(),
                    "defense_members": "every training batch (all members)", "training": run.summary()}
            log(f"Auditing {title} ...")
        t0 = time.time()
        report = run_audit(
            TinyLDMTarget(model), _samples(sh.member_eval), _samples(sh.splits["nonmember_eval"]),
            calibration_members=_samples(sh.member_cal),
            calibration_nonmembers=_samples(sh.splits["nonmember_calibration"]),
            attacks=None if cfg.attacks is None else list(cfg.attacks), config={"seed": cfg.seed, **cfg.audit},
            utility=utility, manifest_sets={"nonmember_defense": sh.splits["nonmember_defense"].ids},
            info={"model": f"smplora demo tiny LDM (diffusers UNet2DConditionModel + peft LoRA) on {ds.title}",
                  "variant": title, "base": sh.base_source, **info},
            title=f"Membership-inference audit: {title} (smplora demo)", progress=progress, out_dir=None,
            references=sh.references)
        seconds[f"audit_{column}"] = round(time.time() - t0, 1)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return {"title": title, "report": report, "training": None if run is None else run.summary(),
            "lora_file": lora_file, "seconds": seconds}


def run_columns(sh: Shared, out: Path, *, jobs: int = 1, progress: bool = True,
                log: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """Every column (:func:`columns_of`), ``jobs`` at a time: ``1`` here, one after another (progress bars);
    more in as many spawned worker processes (no bars; each worker one line per stage on stderr). A worker's
    error is raised here. Returns the columns in table order."""
    from .pipeline import _verdict_line

    columns = columns_of(sh.cfg)
    done: Dict[str, Dict[str, Any]] = {}
    if jobs <= 1:
        for c in columns:
            done[c] = run_column(sh, c, out, progress=progress, log=log)
            log(f"{done[c]['title']}: {_verdict_line(done[c]['report'].verdict)}")
        return done
    n = min(jobs, len(columns))
    threads = torch.get_num_threads()
    log(f"Training and auditing the {len(columns)} columns in {n} worker processes ({threads} torch "
        f"thread{'s' if threads > 1 else ''} each) ...")
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(sh, threads)) as pool:
        futures = {pool.submit(_worker_column, c, str(out)): c for c in _slowest_first(columns)}
        for fut in as_completed(futures):
            c = futures[fut]
            done[c] = fut.result()
            log(f"{done[c]['title']}: {_verdict_line(done[c]['report'].verdict)}")
    return {c: done[c] for c in columns}


def _slowest_first(columns: Sequence[str]) -> List[str]:
    return sorted(columns, key=lambda c: SLOWEST_FIRST.index(c) if c in SLOWEST_FIRST else -1)


_SHARED: Optional[Shared] = None  # a worker's copy, set once by _init_worker


def _init_worker(shared: Shared, threads: int) -> None:
    global _SHARED
    _SHARED = shared
    torch.set_num_threads(threads)


def _worker_column(column: str, out: str) -> Dict[str, Any]:
    assert _SHARED is not None, "_init_worker did not run"
    return run_column(_SHARED, column, Path(out), progress=False, log=_stderr)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
