"""Stand-in for sd-scripts' library/config_util.py: user dataset configs -> dataset groups."""

import copy
import json
from pathlib import Path

from library import train_util


def load_user_config(file):
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"file not found: {file}")
    if file.suffix.lower() == ".json":
        return json.loads(file.read_text())
    if file.suffix.lower() == ".toml":
        import tomllib

        return tomllib.loads(file.read_text())
    raise ValueError(f"not supported config file format: {file}")


def generate_dreambooth_subsets_config_by_subdirs(train_data_dir=None, reg_data_dir=None):
    out = []
    for base, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if base is None or not Path(base).is_dir():
            continue
        for sub in sorted(Path(base).iterdir()):
            head, _, tokens = sub.name.partition("_")
            if sub.is_dir() and head.isdigit() and int(head) > 0:
                out.append({"image_dir": str(sub), "num_repeats": int(head), "is_reg": is_reg, "class_tokens": tokens})
    return out


def _pick(key, *sources, default=None):
    for s in sources:
        if s.get(key) is not None:
            return s[key]
    return default


def generate_dataset_groups(user_config, args):
    """(train group, validation group or None); dataset keys fall back to [general] then args."""
    general = user_config.get("general", {})
    argd = vars(args)
    train, val = [], []
    for ds in user_config.get("datasets", []):
        split = float(_pick("validation_split", ds, general, argd, default=0.0))
        seed = _pick("validation_seed", ds, general, argd, default=None)
        bs = int(_pick("batch_size", ds, general, {"batch_size": argd.get("train_batch_size")}, default=1))
        def subsets(ds=ds):   # sd-scripts builds the validation side from fresh subset objects (dicts copied)
            return [train_util.Subset(
                image_dir=s["image_dir"], num_repeats=int(s.get("num_repeats", 1)), is_reg=bool(s.get("is_reg", False)),
                class_tokens=s.get("class_tokens"), custom_attributes=copy.deepcopy(s.get("custom_attributes")),
                caption_extension=_pick("caption_extension", s, ds, general, argd, default=".caption"))
                for s in ds.get("subsets", [])]
        plw = float(_pick("prior_loss_weight", ds, general, argd, default=1.0))
        reso = _pick("resolution", ds, general, argd, default="8,8")
        reso = tuple(int(v) for v in str(reso).split(","))
        reso = reso * 2 if len(reso) == 1 else reso
        opts = dict(resolution=reso, enable_bucket=bool(_pick("enable_bucket", ds, general, argd, default=False)))
        train.append(train_util.DreamBoothDataset(subsets(), bs, True, split, seed, plw, **opts))
        if split > 0:
            val.append(train_util.DreamBoothDataset(subsets(), bs, False, split, seed, plw, **opts))
    return train_util.DatasetGroup(train), (train_util.DatasetGroup(val) if val else None)
