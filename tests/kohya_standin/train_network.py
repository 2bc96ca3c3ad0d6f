"""Stand-in for sd-scripts' train_network.py: NetworkTrainer with the v0.10.x hook names and
signatures, and a small training loop that calls them in sd-scripts' order."""

import argparse
import hashlib
import io
import json
import math
import os
import random
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from library import config_util, train_util


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)
        self.conv_out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) + self.time(t.float().view(-1, 1) / 1000.0)[:, :, None, None]
        return self.conv_out(F.silu(h))


class TinyLoRANetwork(torch.nn.Module):
    """A low-rank residual on the UNet input, with sd-scripts' network method names (and its
    ``multiplier`` attribute / ``set_multiplier(multiplier)``, which scale the LoRA's output)."""

    def __init__(self, dim=4, multiplier=1.0):
        super().__init__()
        self.multiplier = multiplier
        self.lora_down = torch.nn.Conv2d(4, dim, 1, bias=False)
        self.lora_up = torch.nn.Conv2d(dim, 4, 1, bias=False)
        torch.nn.init.normal_(self.lora_up.weight, std=0.1)

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * self.multiplier

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def save_weights(self, file, dtype, metadata):
        sd = {k: v.detach().clone().cpu() for k, v in self.state_dict().items()}
        if metadata:   # as sd-scripts: a hash over the tensors and the ss_* keys, computed here
            metadata = dict(metadata)
            metadata["sshs_model_hash"] = ss_hash(sd, metadata)
        save_file(sd, file, metadata or None)


def ss_hash(tensors, metadata):
    """The stand-in's sshs_model_hash: SHA-256 over the ss_* keys and the tensors."""
    h = hashlib.sha256(json.dumps({k: v for k, v in sorted(metadata.items()) if k.startswith("ss_")}).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())   # any dtype, bf16 too
    return h.hexdigest()

    def load_weights(self, file):
        return self.load_state_dict(load_file(file))


class NoiseScheduler:
    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)


class NetworkTrainer:
    def __init__(self):
        self.vae_scale_factor = 1.0
        self.is_sdxl = False
        self.step_logs = []          # what a tracker would receive (the stand-in keeps it for tests)
        self.validation_batches = 0  # batches of kohya's own epoch validation (for tests)

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None,
                           keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None):
        logs = {"loss/current": current_loss, "loss/average": avr_loss}
        for i, lr in enumerate(lr_scheduler.get_last_lr()):
            logs[f"lr/group{i}"] = lr
        return logs

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def load_target_model(self, args, weight_dtype, accelerator):
        torch.manual_seed(1234)
        return "standin_v1", [], None, TinyUNet()

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kwargs):
        if getattr(args, "gradient_checkpointing", False) and torch.is_grad_enabled():
            # as sd-scripts' SD1 UNet: torch.utils.checkpoint with use_reentrant=False around the LoRA'd blocks
            return torch.utils.checkpoint.checkpoint(self._denoise, unet, noisy_latents, timesteps, use_reentrant=False)
        return self._denoise(unet, noisy_latents, timesteps)

    def _denoise(self, unet, noisy_latents, timesteps):
        return unet(noisy_latents, timesteps) + self._network(noisy_latents)

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        pass

    def get_noise_scheduler(self, args, device):
        return NoiseScheduler()

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        abar = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps][:, None, None, None]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            pred = self.call_unet(args, accelerator, unet, noisy, timesteps, text_encoder_conds, batch, weight_dtype)
        return pred, noise, timesteps, None

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss

    def get_sai_model_spec(self, args):
        return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "standin-v1/lora",
                "modelspec.title": str(args.output_name)}

    def update_metadata(self, metadata, args):
        pass

    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                      is_train: bool = True):
        pass

    def on_validation_step_end(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True):
        with torch.no_grad():
            latents = batch["latents"].to(accelerator.device) * self.vae_scale_factor
        pred, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, [], unet, network, weight_dtype, train_unet,
            is_train=is_train)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if weighting is not None:
            loss = loss * weighting
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        loss = loss * batch["loss_weights"].to(loss.device)
        loss = self.post_process_loss(loss, args, timesteps, noise_scheduler)
        return loss.mean()

    def train(self, args):
        use_user_config = args.dataset_config is not None
        r = self._prepare_training(args)
        if r is None:
            return
        accelerator, train_group, val_group = r.accelerator, r.train_group, r.val_group
        state = {"step": 0}

        def save_model_hook(models, weights, output_dir):
            with open(os.path.join(output_dir, "train_state.json"), "w") as f:
                json.dump({"current_step": state["step"]}, f)

        accelerator.register_save_state_pre_hook(save_model_hook)
        if args.resume:
            accelerator.load_state(args.resume)
        metadata = {"ss_session_id": random.randint(0, 2**31), **run_metadata(args, train_group, val_group)}
        self.update_metadata(metadata, args)
        metadata.update(dataset_metadata(use_user_config, train_group, args, accelerator.num_processes))
        metadata = {k: str(v) for k, v in metadata.items()}

        def save_model(ckpt_name, unwrapped_nw, steps, epoch_no):
            os.makedirs(args.output_dir, exist_ok=True)
            metadata["ss_steps"] = str(steps)
            metadata["ss_epoch"] = str(epoch_no)
            to_save = {k: metadata[k] for k in ("ss_output_name",)} if args.no_metadata else metadata
            to_save.update(self.get_sai_model_spec(args))
            unwrapped_nw.save_weights(os.path.join(args.output_dir, ckpt_name), None, to_save)

        for epoch, batch in self._training_batches(r, self._validate_epoch):
            with accelerator.accumulate(r.network):
                self.on_step_start(args, accelerator, r.network, r.text_encoders, r.unet, batch, r.weight_dtype,
                                   is_train=True)
                loss = self._optimize(r, batch)
            if self._step_done(r):
                state["step"] = r.global_step
                if args.save_every_n_steps and r.global_step % args.save_every_n_steps == 0:
                    save_model(f"{args.output_name}-step{r.global_step:08d}.safetensors",
                               accelerator.unwrap_model(r.network), r.global_step, epoch)
                    r.save_state(f"-step{r.global_step:08d}")
            self._log_step(r, loss)
        r.save_state("")
        save_model(f"{args.output_name}.safetensors", accelerator.unwrap_model(r.network), r.global_step, r.num_epochs)
        self.final_global_step = r.global_step

    # ------------------------------------------------------------------ the loop's pieces (the v0.11 stand-in too)
    def _prepare_training(self, args):
        """Datasets (``assert_extra_args``), accelerator, model, LoRA (``post_process_network``), optimizer,
        loaders and noise scheduler, in sd-scripts' order (a :class:`Run`); ``None`` when there is no training data."""
        if args.seed is None:
            args.seed = random.randint(0, 2**31)
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        if args.dataset_config:
            user_config = config_util.load_user_config(args.dataset_config)
        else:
            user_config = {"datasets": [{"subsets": config_util.generate_dreambooth_subsets_config_by_subdirs(
                args.train_data_dir, args.reg_data_dir)}]}
        train_group, val_group = config_util.generate_dataset_groups(user_config, args)
        if len(train_group) == 0:
            print("No data found.")
            return None
        self.assert_extra_args(args, train_group, val_group)

        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=True,
                                  mixed_precision=args.mixed_precision)
        weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        _, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
        text_encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]
        unet.requires_grad_(False)
        unet.to(dtype=weight_dtype)   # as sd-scripts: the frozen base model in weight_dtype
        torch.manual_seed(args.seed)
        network = TinyLoRANetwork(args.network_dim or 4)
        if args.full_bf16:            # as sd-scripts: the LoRA itself (weights, gradients) in bf16
            assert args.mixed_precision == "bf16", "full_bf16 requires mixed precision='bf16'"
            network.to(weight_dtype)
        self._network = network
        self.post_process_network(args, accelerator, network, text_encoders, unet)
        optimizer = torch.optim.AdamW(network.parameters(), lr=args.learning_rate)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        g = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(train_group, batch_size=1, shuffle=True, generator=g,
                                                   collate_fn=lambda xs: xs[0])
        val_loader = torch.utils.data.DataLoader(val_group if val_group is not None else [], batch_size=1,
                                                 shuffle=False, collate_fn=lambda xs: xs[0])
        network, optimizer, train_loader, lr_scheduler = accelerator.prepare(network, optimizer, train_loader,
                                                                             lr_scheduler)
        self._network = network
        num_epochs = math.ceil(args.max_train_steps / max(1, len(train_loader) // args.gradient_accumulation_steps))
        return Run(args=args, train_group=train_group, val_group=val_group, accelerator=accelerator,
                   weight_dtype=weight_dtype, text_encoder=text_encoder, text_encoders=text_encoders, vae=vae,
                   unet=unet, network=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   train_loader=train_loader, val_loader=val_loader, num_epochs=num_epochs,
                   noise_scheduler=self.get_noise_scheduler(args, accelerator.device))

    def _training_batches(self, r, end_of_epoch):
        """``(epoch, batch)`` of every training step until ``max_train_steps``, each epoch opened by the network's
        ``on_epoch_start`` and closed by ``end_of_epoch(r, epoch)`` (kohya's validation); the progress bar opens
        on the local main process (shown with --progress only, to keep test logs short)."""
        r.progress_bar = tqdm(range(r.args.max_train_steps), desc="steps",
                              disable=not r.accelerator.is_local_main_process,
                              file=None if r.args.progress else io.StringIO())
        for epoch in range(r.num_epochs):
            r.accelerator.unwrap_model(r.network).on_epoch_start(r.text_encoder, r.unet)
            for batch in r.train_loader:
                yield epoch, batch
                if r.global_step >= r.args.max_train_steps:
                    break
            end_of_epoch(r, epoch)
            if r.global_step >= r.args.max_train_steps:
                break
        r.progress_bar.close()

    def _optimize(self, r, batch):
        """process_batch, then one optimizer step (inside accelerate's gradient accumulation)."""
        loss = self.process_batch(batch, r.text_encoders, r.unet, r.network, r.vae, r.noise_scheduler, r.weight_dtype,
                                  r.weight_dtype, r.accelerator, r.args, None, None, is_train=True,
                                  train_text_encoder=False, train_unet=True)
        r.accelerator.backward(loss)
        r.optimizer.step()
        r.lr_scheduler.step()
        r.optimizer.zero_grad(set_to_none=True)
        return loss

    def _step_done(self, r):
        """Whether the batch completed an optimizer step (the progress bar and the step count then move on)."""
        if not r.accelerator.sync_gradients:
            return False
        r.progress_bar.update(1)
        r.global_step += 1
        return True

    def _log_step(self, r, loss):
        current_loss = loss.detach().item()
        r.losses.append(current_loss)
        avr_loss = sum(r.losses[-10:]) / len(r.losses[-10:])
        r.progress_bar.set_postfix(avr_loss=avr_loss)
        self.step_logs.append(self.generate_step_logs(r.args, current_loss, avr_loss, r.lr_scheduler, None,
                                                      r.optimizer))

    def _validate_epoch(self, r, epoch):
        args = r.args
        every = args.validate_every_n_epochs   # sd-scripts: None validates at the end of every epoch
        if len(r.val_loader) == 0 or not (every is None or (epoch + 1) % every == 0):
            return
        r.accelerator.unwrap_model(r.network).eval()   # epoch validation: process_batch with is_train=False
        for batch in r.val_loader:
            self.validation_batches += 1
            self.on_step_start(r.args, r.accelerator, r.network, r.text_encoders, r.unet, batch, r.weight_dtype,
                               is_train=False)
            self.process_batch(batch, r.text_encoders, r.unet, r.network, r.vae, r.noise_scheduler, r.weight_dtype,
                               r.weight_dtype, r.accelerator, r.args, None, None, is_train=False,
                               train_text_encoder=False, train_unet=True)
            self.on_validation_step_end(r.args, r.accelerator, r.network, r.text_encoders, r.unet, batch,
                                        r.weight_dtype)
        r.accelerator.unwrap_model(r.network).train()


class Run(SimpleNamespace):
    """What the stand-in's training loop works with (NetworkTrainer._prepare_training), and how far it got."""

    def __init__(self, **kw):
        super().__init__(global_step=0, losses=[], progress_bar=None, **kw)

    def save_state(self, suffix):
        """With --save_state: accelerate's state in ``<output_name><suffix>-state``."""
        if self.args.save_state:
            self.accelerator.save_state(os.path.join(self.args.output_dir, f"{self.args.output_name}{suffix}-state"))


def run_metadata(args, train_group, val_group):
    """sd-scripts' header keys of a run, but for its session id (drawn first) and its dataset keys."""
    return {"ss_training_started_at": time.time(), "ss_output_name": args.output_name,
            "ss_learning_rate": args.learning_rate, "ss_network_dim": args.network_dim,
            "ss_num_train_images": train_group.num_train_images, "ss_num_reg_images": train_group.num_reg_images,
            "ss_num_validation_images": val_group.num_train_images if val_group is not None else 0,
            "ss_validation_split": args.validation_split, "ss_validation_seed": args.validation_seed,
            "ss_validate_every_n_epochs": args.validate_every_n_epochs}


def dataset_metadata(use_user_config, train_group, args, num_processes):
    """The dataset keys of sd-scripts' header: with a dataset config one ss_datasets list (and merged tag
    frequencies / folders); without one, per-dataset keys of the single dataset."""
    if use_user_config:
        datasets, freq, dirs = [], {}, {}
        for ds in train_group.datasets:
            datasets.append({"batch_size_per_device": ds.batch_size, "num_train_images": ds.num_train_images,
                             "resolution": (ds.width, ds.height), "enable_bucket": ds.enable_bucket,
                             "tag_frequency": ds.tag_frequency, "bucket_info": ds.bucket_info,
                             "subsets": [{"img_count": s.img_count, "num_repeats": s.num_repeats,
                                          "image_dir": os.path.basename(s.image_dir), "is_reg": s.is_reg}
                                         for s in ds.subsets]})
            for s in ds.subsets:
                if not s.is_reg:
                    dirs[os.path.basename(s.image_dir)] = {"n_repeats": s.num_repeats, "img_count": s.img_count}
            for name, tags in ds.tag_frequency.items():
                freq.setdefault(name, tags)
        return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(freq),
                "ss_dataset_dirs": json.dumps(dirs)}
    (ds,) = train_group.datasets
    dirs, reg_dirs = {}, {}
    for s in ds.subsets:
        (reg_dirs if s.is_reg else dirs)[os.path.basename(s.image_dir)] = {"n_repeats": s.num_repeats,
                                                                           "img_count": s.img_count}
    return {"ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": args.train_batch_size * num_processes * args.gradient_accumulation_steps,
            "ss_resolution": args.resolution, "ss_color_aug": bool(args.color_aug), "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop), "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_enable_bucket": bool(ds.enable_bucket), "ss_bucket_no_upscale": bool(ds.bucket_no_upscale),
            "ss_min_bucket_reso": ds.min_bucket_reso, "ss_max_bucket_reso": ds.max_bucket_reso,
            "ss_keep_tokens": args.keep_tokens, "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_tag_frequency": json.dumps(ds.tag_frequency),
            "ss_bucket_info": json.dumps(ds.bucket_info)}


def setup_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file", type=str, default=None)
    p.add_argument("--output_config", action="store_true")
    p.add_argument("--train_data_dir", type=str, default=None)
    p.add_argument("--reg_data_dir", type=str, default=None)
    p.add_argument("--dataset_config", type=str, default=None)
    p.add_argument("--in_json", type=str, default=None)
    p.add_argument("--caption_extension", type=str, default=".caption")
    p.add_argument("--prior_loss_weight", type=float, default=1.0)
    p.add_argument("--output_dir", type=str, default=None)
    p.add_argument("--output_name", type=str, default=None)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--network_dim", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save_every_n_steps", type=int, default=None)
    p.add_argument("--save_state", action="store_true")
    p.add_argument("--resume", type=str, default=None)
    p.add_argument("--resume_from_huggingface", action="store_true")
    p.add_argument("--no_metadata", action="store_true")
    p.add_argument("--validation_split", type=float, default=0.0)
    p.add_argument("--validation_seed", type=int, default=None)
    p.add_argument("--validate_every_n_epochs", type=int, default=None)
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    p.add_argument("--resolution", type=str, default="8,8")
    p.add_argument("--enable_bucket", action="store_true")
    p.add_argument("--color_aug", action="store_true")
    p.add_argument("--flip_aug", action="store_true")
    p.add_argument("--random_crop", action="store_true")
    p.add_argument("--shuffle_caption", action="store_true")
    p.add_argument("--keep_tokens", type=int, default=0)
    # sd-scripts also offers fp16 / --full_fp16; accelerate's CPU autocast is bf16 only, so the stand-in is too
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "bf16"])
    p.add_argument("--full_bf16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    return p


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = NetworkTrainer()
    trainer.train(args)
