"""kohya's ``ss_*`` header as it would be without the holdout dataset the launcher adds.

``--privacy_holdout_dir`` reaches kohya as one more ``[[datasets]]`` block (``validation_split = 1.0``)
in a generated dataset config. kohya writes different ``ss_*`` keys for a run with a dataset config
(``ss_datasets`` and no per-dataset keys) than for one with ``--train_data_dir`` (``ss_resolution``,
``ss_bucket_info``, ``ss_enable_bucket``, ... and no ``ss_datasets``), and the holdout block shows
up in ``ss_datasets``, ``ss_tag_frequency`` and ``ss_num_validation_images`` (and, when the launcher
switched kohya's validation pass off, in ``ss_validate_every_n_epochs``). :func:`restore` gives
back the keys kohya writes for the user's own command, computed from the same dataset objects
kohya reports on; it runs on the metadata handed to ``network.save_weights``, so kohya's
``sshs_*`` hashes are computed on the restored keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# keys kohya writes only without a dataset config (train_network.py, the "else" branch of its
# dataset metadata), and the ones it writes only with one
NO_CONFIG_KEYS = (
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
)
CONFIG_ONLY_KEYS = ("ss_datasets",)


@dataclass
class HeaderPlan:
    """What the launcher changed about kohya's datasets, recorded when kohya hands them over."""

    user_config: bool                 # the user passed --dataset_config themselves
    member_datasets: List[Any]        # kohya's training datasets, the holdout block's empty one excluded
    holdout_train: Any                # the training side of the holdout block (no images)
    other_validation: List[Any] = field(default_factory=list)  # validation datasets not from the holdout
    validation_off: bool = False      # the launcher set --validate_every_n_epochs to switch kohya's pass off


def plan(user_config: bool, train_group: Any, val_group: Any, validation_off: bool = False) -> Optional[HeaderPlan]:
    """The plan for a run whose last dataset block is the holdout (``None`` if the groups do not show it)."""
    train = list(getattr(train_group, "datasets", None) or [])
    val = list(getattr(val_group, "datasets", None) or [])
    if len(train) < 2 or not val:
        return None
    return HeaderPlan(user_config=user_config, member_datasets=train[:-1], holdout_train=train[-1],
                      other_validation=val[:-1], validation_off=validation_off)


def restore(metadata: Dict[str, str], plan_: HeaderPlan, args: Any, num_processes: int = 1) -> Dict[str, str]:
    """A copy of ``metadata`` with kohya's keys as they are for the user's command without the holdout
    block. Metadata without the dataset keys (``--no_metadata``) only loses the validation count."""
    out = dict(metadata)
    if plan_.validation_off and "ss_validate_every_n_epochs" in out:
        out["ss_validate_every_n_epochs"] = "None"    # the user's value (they gave none)
    if "ss_num_validation_images" in out:
        out["ss_num_validation_images"] = str(sum(int(getattr(d, "num_train_images", 0))
                                                  for d in plan_.other_validation))
    if "ss_datasets" not in out:
        return out
    if plan_.user_config:
        datasets = json.loads(out["ss_datasets"])
        out["ss_datasets"] = json.dumps(datasets[: len(plan_.member_datasets)])
        if "ss_tag_frequency" in out:
            kept = {k for d in plan_.member_datasets for k in (getattr(d, "tag_frequency", None) or {})}
            freq = json.loads(out["ss_tag_frequency"])
            out["ss_tag_frequency"] = json.dumps({k: v for k, v in freq.items() if k in kept})
        return out
    # kohya's keys for --train_data_dir / --in_json runs (one dataset)
    (ds,) = plan_.member_datasets
    for key in CONFIG_ONLY_KEYS:
        out.pop(key, None)
    dirs: Dict[str, Dict[str, int]] = {}
    reg_dirs: Dict[str, Dict[str, int]] = {}
    fine_tuning = getattr(args, "in_json", None) is not None
    for subset in getattr(ds, "subsets", []):
        name = os.path.basename(subset.metadata_file if fine_tuning else subset.image_dir)
        target = reg_dirs if (getattr(subset, "is_reg", False) and not fine_tuning) else dirs
        target[name] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
    values = {
        "ss_batch_size_per_device": args.train_batch_size,
        "ss_total_batch_size": args.train_batch_size * num_processes * args.gradient_accumulation_steps,
        "ss_resolution": args.resolution,
        "ss_color_aug": bool(getattr(args, "color_aug", False)),
        "ss_flip_aug": bool(getattr(args, "flip_aug", False)),
        "ss_random_crop": bool(getattr(args, "random_crop", False)),
        "ss_shuffle_caption": bool(getattr(args, "shuffle_caption", False)),
        "ss_enable_bucket": bool(ds.enable_bucket),
        "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
        "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso,
        "ss_keep_tokens": getattr(args, "keep_tokens", None),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(ds.tag_frequency),
        "ss_bucket_info": json.dumps(ds.bucket_info),
    }
    out.update({k: str(v) for k, v in values.items()})
    return out
