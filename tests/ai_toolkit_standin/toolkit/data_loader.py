"""Stand-in of ai-toolkit's datasets: folders of images with .txt captions, batches of file items.

As in ai-toolkit, a dataset walks its folder (hidden folders skipped), repeats its files ``num_repeats`` times,
loads an image (and a random horizontal flip with ``flip_x``, drawn from Python's random) when an item is read,
and the loader batches items into a ``DataLoaderBatchDTO``; items of an ``is_reg`` dataset are marked.
"""

import os
import random

import numpy as np
import torch

image_extensions = ['.jpg', '.jpeg', '.png', '.webp']


class FileItemDTO:
    def __init__(self, path, dataset_config):
        self.path = path
        self.is_reg = bool(dataset_config.get("is_reg", False))
        self.prior_reg = False
        self.caption_ext = dataset_config.get("caption_ext", "txt").lstrip(".")
        self.resolution = int(dataset_config.get("resolution", 16))
        self.flip_x = bool(dataset_config.get("flip_x", False))
        self.tensor = None
        self.caption = ""

    def load_and_process_image(self):
        from PIL import Image

        with Image.open(self.path) as im:
            im = im.convert("RGB").resize((self.resolution, self.resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.flip_x and random.random() < 0.5:
            tensor = tensor.flip(-1)
        self.tensor = tensor
        side = os.path.splitext(self.path)[0] + "." + self.caption_ext
        self.caption = open(side, encoding="utf-8").read().strip() if os.path.isfile(side) else ""


class DataLoaderBatchDTO:
    def __init__(self, file_items):
        self.file_items = file_items
        self.tensor = torch.stack([f.tensor for f in file_items])
        self.latents = None
        self.mask_tensor = None
        self.unconditional_latents = None
        self.sigmas = None

    def get_is_reg_list(self):
        return [f.is_reg for f in self.file_items]

    def get_caption_list(self):
        return [f.caption for f in self.file_items]

    def get_network_weight_list(self):
        return [1.0 for _ in self.file_items]

    def cleanup(self):
        self.tensor = None
        self.latents = None


class AiToolkitDataset:
    def __init__(self, dataset_config, batch_size=1, sd=None):
        folder = dataset_config.get("dataset_path") or dataset_config["folder_path"]
        files = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith('.')]
            files += [os.path.join(root, n) for n in names
                      if n.lower().endswith(tuple(image_extensions)) and not n.startswith('.')]
        files = sorted(files) * int(dataset_config.get("num_repeats", 1))
        self.file_list = [FileItemDTO(f, dataset_config) for f in files]
        self.batch_size = batch_size

    def __len__(self):
        return len(self.file_list)

    def __getitem__(self, index):
        import copy

        item = copy.copy(self.file_list[index])
        item.load_and_process_image()
        return item


class ConcatDataset:
    def __init__(self, datasets):
        self.datasets = datasets
        self.items = [(d, i) for d in datasets for i in range(len(d))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        dataset, i = self.items[index]
        return dataset[i]


def dto_collation(batch):
    return DataLoaderBatchDTO(file_items=batch)


class DataLoader:
    """Shuffled batches (torch's global generator), as torch's DataLoader with shuffle=True."""

    def __init__(self, dataset, batch_size, collate_fn):
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn

    def __iter__(self):
        order = torch.randperm(len(self.dataset)).tolist()
        for start in range(0, len(order), self.batch_size):
            yield self.collate_fn([self.dataset[i] for i in order[start:start + self.batch_size]])


def get_dataloader_from_datasets(dataset_options, batch_size=1, sd=None):
    if not dataset_options:
        return None
    datasets = [AiToolkitDataset(dict(opt), batch_size=batch_size, sd=sd) for opt in dataset_options]
    return DataLoader(ConcatDataset(datasets), batch_size=batch_size, collate_fn=dto_collation)
