"""Stand-in of ai-toolkit's BaseSDTrainProcess: config copy at construction, run() with resume from the newest
checkpoint in the save root, the training loop with its progress bar, saving and clean-up of old saves."""

import copy
import glob
import json
import os
from types import SimpleNamespace

import torch
from toolkit.accelerator import get_accelerator
from toolkit.data_loader import get_dataloader_from_datasets
from toolkit.network_mixins import LoRASpecialNetwork
from toolkit.stable_diffusion_model import StableDiffusion
from tqdm import tqdm

TRAIN_DEFAULTS = dict(batch_size=1, steps=4, lr=1e-3, gradient_accumulation=1, gradient_accumulation_steps=1,
                      max_grad_norm=1.0, reg_weight=1.0, cache_text_embeddings=False, diff_output_preservation=False,
                      inverted_mask_prior=False, do_prior_divergence=False, dtype="fp32",
                      optimizer="adamw")


def get_meta_for_safetensors(meta, name=None):
    text = json.dumps(meta)
    if name is not None:
        text = text.replace("[name]", name)
    out = json.loads(text)
    out["software"] = {"name": "ai-toolkit-standin"}
    for key, value in out.items():
        if not isinstance(value, str):
            out[key] = json.dumps(value)
    out["format"] = "pt"
    return out


class BaseSDTrainProcess:
    def __init__(self, process_id: int, job, config, custom_pipeline=None):
        self.process_id = process_id
        self.job = job
        self.config = config
        self.name = config.get('name', job.name)
        self.meta = copy.deepcopy(job.meta)
        self.training_folder = config['training_folder']
        self.save_root = os.path.join(self.training_folder, self.name)
        self.accelerator = get_accelerator()
        self.device_torch = self.accelerator.device
        self.step_num = 0
        self.start_step = 0
        self.grad_accumulation_step = 1
        self.is_grad_accumulation_step = False
        self.train_config = SimpleNamespace(**{**TRAIN_DEFAULTS, **config.get('train', {})})
        self.save_config = SimpleNamespace(**{"save_every": 0, "max_step_saves_to_keep": 4, **config.get('save', {})})
        self.network_config = config.get('network')
        self.is_fine_tuning = self.network_config is None
        self.named_lora = False
        self.datasets = [d for d in config.get('datasets', []) if not d.get('is_reg')]
        self.datasets_reg = [d for d in config.get('datasets', []) if d.get('is_reg')] or None
        self.training_seed = config.get('training_seed')
        self.additional_logs = {}
        self.logged = []
        self.progress_bar = None
        self.network = None
        self.sd = None
        os.makedirs(self.save_root, exist_ok=True)
        with open(os.path.join(self.save_root, 'config.yaml'), 'w') as f:
            json.dump(self.job.raw_config, f)

    def add_meta(self, additional_meta):
        self.meta.update(additional_meta)

    def update_training_metadata(self):
        o_dict = {"training_info": {"step": self.step_num, "epoch": 0}, "ss_output_name": self.job.name}
        self.add_meta(o_dict)

    def get_latest_save_path(self, name=None, post=''):
        name = name or self.job.name
        paths = []
        for pattern in (f"{name}*{post}.safetensors", f"{name}*{post}.pt", f"{name}*{post}"):
            paths.extend(glob.glob(os.path.join(self.save_root, pattern)))
        paths = [p for p in paths if os.path.exists(p)]
        return max(paths, key=lambda p: (os.path.getmtime(p), p)) if paths else None

    def load_weights(self, path):
        from safetensors import safe_open

        self.network.load_weights(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        info = json.loads(meta.get("training_info", "{}"))
        if "step" in info:
            self.step_num = self.start_step = int(info["step"])
        return None

    def clean_up_saves(self):
        files = sorted(glob.glob(os.path.join(self.save_root, f"{self.job.name}_*.safetensors")),
                       key=lambda p: (os.path.getmtime(p), p))
        for old in files[:-self.save_config.max_step_saves_to_keep]:
            os.remove(old)

    def post_save_hook(self, save_path):
        pass

    def save(self, step=None):
        step_num = '' if step is None else f"_{str(step).zfill(9)}"
        self.update_training_metadata()
        save_meta = get_meta_for_safetensors(copy.deepcopy(self.meta), self.job.name)
        file_path = os.path.join(self.save_root, f'{self.job.name}{step_num}.safetensors')
        self.network.save_weights(file_path, dtype=torch.float32, metadata=save_meta)
        self.clean_up_saves()
        self.post_save_hook(file_path)

    def before_dataset_load(self):
        pass

    def hook_before_train_loop(self):
        pass

    def hook_train_loop(self, batch):
        return {'loss': 0.0}

    def run(self):
        self.sd = StableDiffusion(seed=self.training_seed or 0)
        if self.training_seed is not None:
            torch.manual_seed(self.training_seed)
        self.network = LoRASpecialNetwork()
        self.sd.unet.network = self.sd.network = self.network
        latest_save_path = self.get_latest_save_path(self.name)
        if latest_save_path is not None:
            print(f"#### IMPORTANT RESUMING FROM {latest_save_path} ####")
            self.load_weights(latest_save_path)
        self.params = list(self.network.parameters())
        optimizer = torch.optim.SGD if self.train_config.optimizer == "sgd" else torch.optim.AdamW
        self.optimizer = optimizer(self.params, lr=self.train_config.lr)
        self.before_dataset_load()
        self.data_loader = get_dataloader_from_datasets(self.datasets, self.train_config.batch_size, self.sd)
        reg_loader = get_dataloader_from_datasets(self.datasets_reg, self.train_config.batch_size, self.sd)
        self.hook_before_train_loop()
        self.progress_bar = tqdm(total=self.train_config.steps, desc=self.job.name, initial=self.step_num)
        iterator = iter(self.data_loader)
        reg_iterator = iter(reg_loader) if reg_loader is not None else None
        for step in range(self.step_num, self.train_config.steps):
            self.step_num = step
            is_save_step = self.save_config.save_every and self.step_num % self.save_config.save_every == 0
            batch_list = []
            for _ in range(self.train_config.gradient_accumulation):
                if step % 2 == 0 and reg_iterator is not None and not is_save_step:
                    batch = next(reg_iterator, None)
                    if batch is None:
                        reg_iterator = iter(reg_loader)
                        batch = next(reg_iterator)
                else:
                    batch = next(iterator, None)
                    if batch is None:
                        iterator = iter(self.data_loader)
                        batch = next(iterator)
                batch_list.append(batch)
            is_optimizer_step = self.grad_accumulation_step >= self.train_config.gradient_accumulation_steps
            self.is_grad_accumulation_step = not is_optimizer_step
            if is_optimizer_step:
                self.grad_accumulation_step = 0
            loss_dict = self.hook_train_loop(batch_list)
            prog_bar_string = f"lr: {self.train_config.lr:.1e}"
            for key, value in loss_dict.items():
                prog_bar_string += f" {key}: {value:.3e}"
            self.progress_bar.set_postfix_str(prog_bar_string)
            self.logged.append({"step": step, **loss_dict, **self.additional_logs})
            self.additional_logs = {}
            if self.step_num != self.start_step and is_save_step:
                self.save(self.step_num)
            self.progress_bar.update(step + 1 - self.progress_bar.n)
            self.step_num = step + 1
            self.grad_accumulation_step += 1
        self.progress_bar.close()
        self.save()
