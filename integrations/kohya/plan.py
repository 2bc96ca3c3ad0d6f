"""What a private kohya run settles before its first training step, each piece built once, then read-only.

- :func:`plan_run` (:class:`Plan`), before kohya's ``train()`` starts: every check that needs no dataset (the DP
  options' too: :func:`.dp_noise.check_args`), the attacker state and the DP state continued, the manifest's path,
  the privacy holdout joined to kohya's dataset config;
- :func:`split_datasets` (:class:`Split`), when kohya hands over its dataset groups (``assert_extra_args``):
  members and non-members checked disjoint by content, the header plan, the role tags, the announcement;
- :func:`write_records`, at the first training step once every check has passed: the manifest and the
  combined dataset config kept in the output folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from smplora_plugin import PrivacyRegularizer, __version__
from smplora_plugin.errors import ConfigError

from .._common import summary_box
from . import checkpoints, data, dp_noise, header, reach
from .options import KohyaPrivacySettings

logger = logging.getLogger("smplora.kohya")


@dataclass(frozen=True)
class Plan:
    """The run's set-up from kohya's arguments (:func:`plan_run`)."""

    layout: reach.SaveLayout                  # how kohya saves (48d368fa closure / v0.11 method)
    manifest: Path
    source: str                               # where the non-members come from (published in the LoRA)
    user_dataset_config: bool                 # the user gave --dataset_config themselves
    validation_off: bool = False              # kohya's epoch validation over the holdout switched off
    resumed_from_step: int = 0                # the step of the attacker state continued (0: a new attacker)
    dp_state: Optional[Dict[str, Any]] = None         # the DP state of the --resume folder (DP noise only)
    dataset_config: Optional[Dict[str, Any]] = None   # the combined config kohya is pointed at (with a holdout dir)
    dataset_config_path: Optional[Path] = None        # where it is kept once every check has passed
    tmp_dir: Optional[Path] = None                    # where kohya reads it from until then

    def cleanup(self) -> None:
        """Remove the temporary copy of the combined dataset config (kohya has read it, or the run ended)."""
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


@dataclass(frozen=True)
class Split:
    """Members and non-members as kohya's dataset groups hold them (:func:`split_datasets`)."""

    val_group: Any                            # kohya's validation group: the non-members
    counts: Dict[str, int]                    # images by set (member / nonmember / regularization)
    records: Dict[str, Any]                   # the manifest's content, written by write_records
    header_plan: Optional[header.HeaderPlan]  # how kohya's header is restored (runs with a holdout dir)
    train_rows: int = 0                       # kohya's num_train_images (DP noise: the accountant's N)
    batch_per_device: int = 0                 # the largest batch_size of the training datasets (DP noise)


def plan_run(settings: KohyaPrivacySettings, args: Any, reg: Optional[PrivacyRegularizer],
             layout: reach.SaveLayout) -> Plan:
    """Check kohya's ``args`` for the privacy settings, continue the attacker state in ``reg`` (see
    :func:`.checkpoints.state_to_continue`; ``reg`` is ``None`` for DP-SGD alone) and read the DP state to continue
    (:func:`.checkpoints.dp_state_to_continue`), then point kohya at the non-member data: the holdout dir as one more
    validation-only dataset block, and a seed for a ``validation_split`` carve-out. Everything that can fail
    runs before ``args`` or any file is changed; the combined dataset config lives in a temporary folder until
    :func:`write_records` keeps it."""
    s = settings
    if s.dp is not None:
        dp_noise.check_args(s, args)
    output_dir = Path(getattr(args, "output_dir", None) or ".")
    name = getattr(args, "output_name", None) or "last"
    manifest = s.manifest or output_dir / f"{name}_smplora_manifest.json"
    carve_out = data.uses_validation_split(args)   # before the holdout block (split 1.0) is added
    if s.config is not None and s.config.calibrated and getattr(args, "network_train_text_encoder_only", False):
        raise ConfigError(
            "calibrated features (--privacy_preset robust / --privacy_calibrated) compare the UNet's prediction with "
            "and without its LoRA at the same text conditioning; with --network_train_text_encoder_only the UNet "
            "has no LoRA, so every calibrated feature would be 0. Use --privacy_preset paper or "
            "--no-privacy_calibrated.")
    holdout_cfg = data.holdout_dataset_config(args, s.holdout_dir) if s.holdout_dir is not None else None
    if holdout_cfg is not None:
        reach.validation_switch(args)     # kohya's pass over the holdout must be switchable off
    user_dataset_config = bool(getattr(args, "dataset_config", None))
    dp_resume = checkpoints.dp_state_to_continue(s, args)
    state_file = checkpoints.state_to_continue(s, args) if reg is not None else None
    resumed = checkpoints.resume(reg, state_file) if state_file is not None else 0
    # every check has passed: now point kohya at the non-member data
    fields: Dict[str, Any] = {}
    source = ""
    if holdout_cfg is not None:
        kept = output_dir / f"{name}_smplora_dataset.json"
        tmp_dir = Path(tempfile.mkdtemp(prefix="smplora_kohya_"))
        try:
            path = data.write_dataset_config(holdout_cfg, tmp_dir / kept.name)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        fields.update(dataset_config=holdout_cfg, dataset_config_path=kept, tmp_dir=tmp_dir)
        n_holdout = sum(len(images) for _, images in data.holdout_subfolders(s.holdout_dir))
        logger.warning(
            f"SMP-LoRA: --privacy_holdout_dir {s.holdout_dir} ({n_holdout} images) joins your datasets as a "
            "validation-only dataset (validation_split = 1.0, never trained on). kohya logs 'contains 0 image "
            "files' and 'ignore subset ... no images found' for its folders: that is the empty training side "
            "of that dataset; its images are in kohya's validation dataset. Your LoRA's ss_* header is "
            "written as without it.")
        reach.use_dataset_config(args, path)
        source = f"holdout_dir:{Path(s.holdout_dir).name}"   # folder name only: metadata gets published
        if not data.asks_validation(args, holdout_cfg):
            # kohya validates a validation dataset at the end of every epoch unless told otherwise: on the
            # holdout that is a cost a run without privacy never pays, which the user did not ask for
            reach.validation_off(args)
            fields["validation_off"] = True
            logger.warning(
                "SMP-LoRA: kohya's own validation pass over the held-out images is off (without "
                "--validate_every_n_epochs / --validate_every_n_steps kohya would run it at the end of every "
                "epoch, several no-grad forwards per held-out batch, which a run without privacy does not pay). "
                "Pass --validate_every_n_epochs 1 to have kohya report a validation loss on them.")
    if carve_out:
        if getattr(args, "validation_seed", None) is None:
            reach.seed_validation_split(args, s.seed)
            logger.warning(f"SMP-LoRA: validation_split carve-out is seeded with validation_seed={s.seed} "
                           "(without a seed kohya shuffles the training and validation sides differently, "
                           "so an image could land on both)")
        source = (source + "+" if source else "") + \
            f"validation_split:{getattr(args, 'validation_split', 0.0)}@seed{args.validation_seed}"
    if dp_resume is not None:
        fields["dp_state"] = dp_resume[1]
    return Plan(layout=layout, manifest=manifest, source=source, user_dataset_config=user_dataset_config,
                resumed_from_step=resumed, **fields)


def split_datasets(plan: Plan, settings: KohyaPrivacySettings, args: Any, train_group: Any, val_group: Any) -> Split:
    """Members and non-members from kohya's dataset groups (checked disjoint by content), the header plan of a
    holdout run (``args`` then points at the kept copy of the combined config, the temporary one is removed),
    the role tags in kohya's subsets, and the announcement of the split."""
    holdout = settings.holdout_dir
    reach.dataset_groups(train_group, val_group, header_restore=plan.dataset_config is not None,
                         user_config=plan.user_dataset_config)
    source = plan.source or "validation"
    seed = settings.seed
    extra = {"holdout_dir": str(holdout.resolve()) if holdout is not None else None,
             "validation_split": getattr(args, "validation_split", None),
             "validation_seed": getattr(args, "validation_seed", None), "smplora_version": __version__}
    splits = data.check_and_record(train_group, val_group, manifest=None, seed=seed, source=source, extra=extra,
                                   require_nonmembers=settings.objective is not None)
    rows, batch = reach.dataset_counts(train_group) if settings.dp is not None else (0, 0)
    header_plan = None
    if plan.dataset_config is not None:   # kohya has read the combined config: point args at the kept copy
        header_plan = reach.holdout_plan(plan.user_dataset_config, train_group, val_group, holdout,
                                         validation_off=plan.validation_off)
        reach.use_dataset_config(args, plan.dataset_config_path)
        plan.cleanup()
    reach.tag_roles(train_group, data.ROLE_KEY, lambda sub: "reg" if getattr(sub, "is_reg", False) else "member")
    reach.tag_roles(val_group, data.ROLE_KEY, lambda sub: "nonmember")
    _announce(plan, settings, splits)
    return Split(val_group=val_group, counts={k: len(v) for k, v in splits.items()},
                 records={"splits": splits, "seed": seed, "source": source, "extra": extra}, header_plan=header_plan,
                 train_rows=rows, batch_per_device=batch)


def write_records(plan: Plan, split: Split) -> None:
    """The manifest and the combined dataset config, written once every check has passed (main process)."""
    data.record(plan.manifest, **split.records)
    if plan.dataset_config is not None and plan.dataset_config_path is not None:
        data.write_dataset_config(plan.dataset_config, plan.dataset_config_path)


def _announce(plan: Plan, settings: KohyaPrivacySettings, splits: Dict[str, list]) -> None:
    """The summary box of the run's privacy settings and split (main process)."""
    holdout = settings.holdout_dir
    carved = [p for p in splits["nonmember"]
              if holdout is None or not Path(p).resolve().is_relative_to(Path(holdout).resolve())]
    cfg = settings.config
    if cfg is None:     # --privacy dpsgd
        _announce_dp_only(plan, settings, splits, carved)
        return
    lines = [
        f"SMP-LoRA (smplora-plugin {__version__}): {cfg.objective} objective, alpha={cfg.alpha}, "
        f"beta={cfg.beta}, k_steps={cfg.k_steps}",
        *([f"with DP noise: every image's own {settings.method} term, clipped and noised (details at the first "
           "training step)"] if settings.dp is not None else []),
        *(["base-calibrated features: one extra no-grad forward per batch with the LoRA switched off "
           "(network.set_multiplier(0))"] if cfg.calibrated else []),
        *([f"privacy fraction {cfg.privacy_fraction:g}, taken over steps: step k's privacy term uses the "
           f"first ceil((k+1) f m) - ceil(k f m) of its m member images (none on some steps at small batches); "
           f"held-out forwards run on ceil(f x batch) images" + (
               "; the base forward (the LoRA-off denoiser forward) of a training batch runs on the privacy rows "
               "only, and not at all on a step without one" if cfg.calibrated else "")]
          if cfg.privacy_fraction < 1 else []),
        f"members (trained on, shown to the proxy attacker): {len(splits['member'])} images",
        f"non-members (NEVER trained on): {len(splits['nonmember'])} images [{plan.source or 'validation dataset'}]",
    ]
    if carved:
        lines.append(f"!! {len(carved)} image(s) were CARVED OUT of your training folders as non-members and "
                     f"will NOT be trained on: {data.describe(carved)}")
    if splits.get("regularization"):
        lines.append(f"regularisation images (trained on, never shown to the attacker): "
                     f"{len(splits['regularization'])}")
    lines += [f"manifest: {plan.manifest}",
              "loss display: avr_loss stays kohya's denoising loss; the progress bar adds mia_ce / mia_acc"
              + (" / eps" if settings.dp is not None else "")]
    if data.is_main_process():
        print(summary_box(lines), flush=True)


def _announce_dp_only(plan: Plan, settings: KohyaPrivacySettings, splits: Dict[str, list], carved: list) -> None:
    """The summary box of a ``--privacy dpsgd`` run (main process): the images, the manifest."""
    lines = [f"DP-SGD (smplora-plugin {__version__}): per-image gradients of kohya's own loss, clipped and noised "
             "at every optimiser step; no SMP-LoRA term (sigma, clip and epsilon at the first training step)",
             f"training images (the records the epsilon protects): {len(splits['member'])} images"]
    if splits.get("nonmember"):
        lines.append(f"non-members (NEVER trained on, for an audit): {len(splits['nonmember'])} images "
                     f"[{plan.source or 'validation dataset'}]")
    if carved:
        lines.append(f"!! {len(carved)} image(s) were CARVED OUT of your training folders as non-members and "
                     f"will NOT be trained on: {data.describe(carved)}")
    if splits.get("regularization"):
        lines.append(f"regularisation images (trained on): {len(splits['regularization'])}")
    lines += [f"manifest: {plan.manifest}", "loss display: avr_loss stays kohya's loss; the progress bar adds eps"]
    if data.is_main_process():
        print(summary_box(lines), flush=True)
