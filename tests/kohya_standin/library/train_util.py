"""Stand-in for sd-scripts' library/train_util.py (datasets, TOML config reading)."""

import argparse
import logging
import os
import random
from pathlib import Path

import numpy as np
import tomllib
import torch

logger = logging.getLogger("standin.train_util")

IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


class ImageInfo:
    def __init__(self, image_key, num_repeats, caption, is_reg, absolute_path):
        self.image_key, self.num_repeats, self.caption = image_key, num_repeats, caption
        self.is_reg, self.absolute_path = is_reg, absolute_path
        self.latents = None


class Subset:
    def __init__(self, image_dir, num_repeats=1, is_reg=False, class_tokens=None, custom_attributes=None,
                 caption_extension=".caption"):
        self.image_dir, self.num_repeats, self.is_reg = image_dir, num_repeats, is_reg
        self.class_tokens, self.caption_extension = class_tokens, caption_extension
        self.custom_attributes = custom_attributes if custom_attributes is not None else {}
        self.img_count = 0


def glob_images(directory):
    return sorted(str(p) for p in Path(directory).iterdir() if p.suffix in IMAGE_EXTENSIONS)


def image_latents(path):
    """4x8x8 'latents' from an image file: RGB resized to 8x8 plus its mean, in [-1, 1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((8, 8))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return torch.cat([x, x.mean(0, keepdim=True)])


class DreamBoothDataset(torch.utils.data.Dataset):
    def __init__(self, subsets, batch_size, is_training_dataset, validation_split, validation_seed,
                 prior_loss_weight=1.0,
                 resolution=(8, 8), enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024):
        self.batch_size, self.is_training_dataset = batch_size, is_training_dataset
        self.prior_loss_weight = prior_loss_weight
        self.width, self.height = resolution
        self.enable_bucket, self.bucket_no_upscale = enable_bucket, False
        self.min_bucket_reso, self.max_bucket_reso = min_bucket_reso, max_bucket_reso
        self.tag_frequency = {}    # as sd-scripts: folder name -> tag -> count, set for every subset read
        self.image_data, self.image_to_subset, self.subsets = {}, {}, []
        self.num_train_images = self.num_reg_images = 0
        keys = []
        for subset in subsets:
            paths = glob_images(subset.image_dir) if Path(subset.image_dir).is_dir() else []
            if validation_split > 0:
                if subset.is_reg:
                    paths = paths if is_training_dataset else []
                else:
                    order = list(paths)
                    random.Random(validation_seed).shuffle(order)
                    n_val = int(round(len(order) * validation_split))
                    paths = order[: len(order) - n_val] if is_training_dataset else order[len(order) - n_val:]
            logger.info(f"found directory {subset.image_dir} contains {len(paths)} image files")
            captions = []
            for p in paths:
                cap_file = Path(p).with_suffix(subset.caption_extension)
                captions.append(cap_file.read_text() if cap_file.is_file() else (subset.class_tokens or ""))
            freq = self.tag_frequency.setdefault(os.path.basename(subset.image_dir), {})
            for caption in captions:
                for tag in (t.strip() for t in caption.split(",")):
                    if tag:
                        freq[tag] = freq.get(tag, 0) + 1
            if not paths:
                logger.warning(f"ignore subset with image_dir='{subset.image_dir}': no images found")
                continue
            subset.img_count = len(paths)
            for p, caption in zip(paths, captions):
                info = ImageInfo(p, subset.num_repeats, caption, subset.is_reg, os.path.abspath(p))
                self.image_data[p] = info
                self.image_to_subset[p] = subset
                keys += [p] * subset.num_repeats
                if subset.is_reg:
                    self.num_reg_images += subset.num_repeats
                else:
                    self.num_train_images += subset.num_repeats
            self.subsets.append(subset)
        self.batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
        self.bucket_info = {"buckets": {0: {"resolution": [self.width, self.height], "count": len(keys)}},
                            "mean_img_ar_error": 0.0}

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        keys = self.batches[i]
        infos = [self.image_data[k] for k in keys]
        for info in infos:
            if info.latents is None:
                info.latents = image_latents(info.absolute_path)
        return {
            "latents": torch.stack([info.latents for info in infos]),
            "captions": [info.caption for info in infos],
            "custom_attributes": [self.image_to_subset[k].custom_attributes for k in keys],
            "loss_weights": torch.tensor([self.prior_loss_weight if info.is_reg else 1.0 for info in infos]),
        }


class DatasetGroup(torch.utils.data.ConcatDataset):
    def __init__(self, datasets):
        super().__init__(datasets)
        self.image_data = {}
        self.num_train_images = sum(d.num_train_images for d in datasets)
        self.num_reg_images = sum(d.num_reg_images for d in datasets)
        for d in datasets:
            self.image_data.update(d.image_data)


def verify_command_line_training_args(args):
    return None


def read_config_from_file(args, parser):
    """Flatten every TOML section into one namespace, then let the command line override it."""
    if not args.config_file:
        return args
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    import sys

    args = parser.parse_args(sys.argv[1:], namespace=argparse.Namespace(**flat))
    args.config_file = os.path.splitext(args.config_file)[0]
    return args
