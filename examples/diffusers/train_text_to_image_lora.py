#!/usr/bin/env python
"""Text-to-image LoRA fine-tuning of a Stable-Diffusion-style UNet, with SMP-LoRA privacy.

Written for smplora-plugin, following the structure of diffusers' ``examples/text_to_image/
train_text_to_image_lora.py`` recipe (argument names, accelerate loop, peft adapter, checkpoint hooks,
``save_lora_weights``), so that the lines marked ``# [smplora]`` are the same ones a user pastes into the
official script (see PATCH.md next to this file). Differences from the official recipe, none of them
privacy related: images come from a local folder (``metadata.jsonl`` or ``.txt`` captions) without the
``datasets`` library, preprocessing uses PIL + torch instead of torchvision, the data order is seeded
and skipped on resume (so resuming is exact), and ``--report_to jsonl`` writes logs to a JSON-lines file.

Runs offline, e.g. on the tiny pipeline of ``make_tiny_pipeline.py``::

    python examples/diffusers/make_tiny_pipeline.py --out /tmp/tiny --digits 32
    python examples/diffusers/train_text_to_image_lora.py --pretrained_model_name_or_path /tmp/tiny/pipeline \
        --train_data_dir /tmp/tiny/train --resolution 32 --train_batch_size 4 --max_train_steps 8 \
        --privacy smplora --privacy_holdout_dir /tmp/tiny/holdout --privacy_feature_grid 8 \
        --output_dir /tmp/tiny/out

Add ``--privacy_preset robust`` for base-calibrated features (alpha 20, attacker lr 1e-3): one extra
no-grad forward of the UNet with the LoRA disabled per training and held-out forward. DP-SGD runs through the
same lines: ``--privacy dpsgd --privacy_noise_multiplier 1.0`` (no holdout needed), or SMP-LoRA + DP noise with
``--privacy smplora --privacy_noise_multiplier 1.0``.
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from smplora_plugin.integrations._common import list_images  # the image files of a folder, sorted (recursive)
from smplora_plugin.integrations.diffusers import HoldoutImages, PrivacyRegularizer, add_privacy_args  # [smplora]

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Text-to-image LoRA training with optional SMP-LoRA privacy.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="Path to a diffusers-format Stable Diffusion pipeline folder.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, required=True,
                        help="Folder of training images with metadata.jsonl (file_name, text) or .txt captions.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--caption_column", type=str, default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--output_dir", type=str, default="sd-model-finetuned-lora")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true", default=False)
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", default=1.0, type=float)
    parser.add_argument("--prediction_type", type=str, default=None, choices=[None, "epsilon", "v_prediction"])
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", type=str, default="jsonl",
                        help='"jsonl" (a logs.jsonl file in the logging dir), "none", or an accelerate tracker.')
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='A checkpoint folder name under output_dir, or "latest".')
    parser.add_argument("--noise_offset", type=float, default=0)
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    parser.add_argument("--validation_prompt", type=str, default=None)
    parser.add_argument("--num_validation_images", type=int, default=1)
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    add_privacy_args(parser)  # [smplora]
    args = parser.parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    return args


class JsonlTracker(GeneralTracker):
    """A minimal accelerate tracker that appends ``{"step": ..., **values}`` lines to ``logs.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / "logs.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        with open(self.path.with_name("config.json"), "w") as f:
            json.dump({k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
                      f, indent=1, sort_keys=True)

    def log(self, values: dict, step=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def read_image_folder(folder, caption_column):
    """(image paths, captions) of an image folder: metadata.jsonl (file_name + caption) or sidecar .txt files."""
    folder = Path(folder)
    files = list_images(folder)
    if not files:
        raise ValueError(f"--train_data_dir {folder} contains no images.")
    captions = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for line in meta.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                captions[os.path.normpath(row["file_name"])] = row[caption_column]
    out = []
    for f in files:
        rel = os.path.normpath(os.path.relpath(f, folder))
        if rel in captions:
            out.append(captions[rel])
        elif f.with_suffix(".txt").is_file():
            out.append(f.with_suffix(".txt").read_text().strip())
        else:
            raise ValueError(f"no caption for {f}: add it to metadata.jsonl or write {f.with_suffix('.txt').name}.")
    return files, out


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Image folder dataset; applies the batched ``transform`` to one example at a time (like ``with_transform``)."""

    def __init__(self, files, captions, image_column, caption_column, transform):
        self.files, self.captions = list(files), list(captions)
        self.image_column, self.caption_column, self.transform = image_column, caption_column, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            im.load()
            image = im.copy()
        batch = self.transform({self.image_column: [image], self.caption_column: [self.captions[i]]})
        return {k: v[0] for k, v in batch.items()}


def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    log_with = None if args.report_to == "none" else (
        JsonlTracker("text2image-fine-tune", logging_dir) if args.report_to == "jsonl" else args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=accelerator_project_config,
        # seeded sampler: the data order does not depend on the global RNG, so resuming is exact
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed or 0),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)

    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)

    # Load scheduler, tokenizer and models.
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer",
                                              revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                 revision=args.revision)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                        variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                revision=args.revision, variant=args.variant)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16

    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    # a list, not a filter(): the optimizer would exhaust a filter and gradient clipping would then be a no-op
    lora_layers = [p for p in unet.parameters() if p.requires_grad]

    def unwrap_model(model):
        return accelerator.unwrap_model(model)

    # Save / load only the LoRA layers in checkpoints (as diffusers' LoRA scripts do).
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            unet_lora_layers_to_save = None
            for model in models:
                if isinstance(model, type(unwrap_model(unet))):
                    unet_lora_layers_to_save = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                else:
                    raise ValueError(f"unexpected save model: {model.__class__}")
                weights.pop()
            StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=unet_lora_layers_to_save,
                                                      safe_serialization=True)

    def load_model_hook(models, input_dir):
        unet_ = None
        while len(models) > 0:
            model = models.pop()
            if isinstance(model, type(unwrap_model(unet))):
                unet_ = model
            else:
                raise ValueError(f"unexpected load model: {model.__class__}")
        lora_state_dict, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
        unet_state_dict = {k.replace("unet.", ""): v for k, v in lora_state_dict.items() if k.startswith("unet.")}
        unet_state_dict = convert_unet_state_dict_to_peft(unet_state_dict)
        incompatible = set_peft_model_state_dict(unet_, unet_state_dict, adapter_name="default")
        if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
            raise ValueError(f"unexpected LoRA keys in checkpoint: {incompatible.unexpected_keys}")
        if args.mixed_precision == "fp16":
            cast_training_params([unet_], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.scale_lr:
        args.learning_rate = (args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size
                              * accelerator.num_processes)

    optimizer = torch.optim.AdamW(lora_layers, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # Dataset and preprocessing (the recipe's tokenize_captions / train_transforms / preprocess_train / collate_fn).
    train_files, train_captions = read_image_folder(args.train_data_dir, args.caption_column)
    if args.max_train_samples is not None:
        order = np.random.default_rng(args.seed).permutation(len(train_files))[: args.max_train_samples]
        train_files, train_captions = [train_files[i] for i in order], [train_captions[i] for i in order]

    def tokenize_captions(examples, is_train=True):
        captions = []
        for caption in examples[args.caption_column]:
            if isinstance(caption, str):
                captions.append(caption)
            elif isinstance(caption, (list, np.ndarray)):
                captions.append(random.choice(caption) if is_train else caption[0])
            else:
                raise ValueError(f"Caption column `{args.caption_column}` should contain strings or lists of strings.")
        inputs = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_tensors="pt")
        return inputs.input_ids

    def train_transforms(image):
        """Resize (shorter side, bilinear), crop, optional flip, to [-1, 1] CHW tensor."""
        w, h = image.size
        scale = args.resolution / min(w, h)
        image = image.resize((max(args.resolution, round(w * scale)), max(args.resolution, round(h * scale))),
                             Image.BILINEAR)
        w, h = image.size
        if args.center_crop:
            left, top = (w - args.resolution) // 2, (h - args.resolution) // 2
        else:
            left = int(torch.randint(0, w - args.resolution + 1, ()).item())
            top = int(torch.randint(0, h - args.resolution + 1, ()).item())
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        if args.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    def preprocess_train(examples):
        images = [image.convert("RGB") for image in examples[args.image_column]]
        examples["pixel_values"] = [train_transforms(image) for image in images]
        examples["input_ids"] = tokenize_captions(examples)
        return examples

    train_dataset = ImageCaptionDataset(train_files, train_captions, args.image_column, args.caption_column,
                                        preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"pixel_values": pixel_values, "input_ids": input_ids}

    # Non-member batches through the same preprocessing; checks the folder before any training.  # [smplora]
    holdout = HoldoutImages.from_args(args, preprocess_train, collate_fn, accelerator)  # [smplora]

    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed or 0),
    )

    num_warmup_steps_for_scheduler = args.lr_warmup_steps * accelerator.num_processes
    if args.max_train_steps is None:
        len_train_dataloader_after_sharding = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(len_train_dataloader_after_sharding / args.gradient_accumulation_steps)
        num_training_steps_for_scheduler = (args.num_train_epochs * num_update_steps_per_epoch
                                            * accelerator.num_processes)
    else:
        num_training_steps_for_scheduler = args.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=num_warmup_steps_for_scheduler,
                                 num_training_steps=num_training_steps_for_scheduler)

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)

    reg = PrivacyRegularizer.from_args(args, device=accelerator.device)  # [smplora] None with --privacy none
    if reg is not None:  # [smplora] checkpoint hooks; with DP noise DP-SGD on the LoRA (smplora_dp_state.safetensors)
        reg.attach(accelerator, holdout,  # [smplora]
                   model=unet, optimizer=optimizer, train_dataloader=train_dataloader)  # [smplora] (DP noise only)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process and log_with is not None:
        accelerator.init_trackers("text2image-fine-tune", config=vars(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step = 0
    first_epoch = 0

    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")]
            dirs = sorted(dirs, key=lambda x: int(x.split("-")[1]))
            path = dirs[-1] if len(dirs) > 0 else None
        if path is None:
            accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. "
                              "Starting a new training run.")
            args.resume_from_checkpoint = None
            initial_global_step = 0
        else:
            accelerator.print(f"Resuming from checkpoint {path}")
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])
            initial_global_step = global_step
            first_epoch = global_step // num_update_steps_per_epoch
    else:
        initial_global_step = 0
    resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(range(0, args.max_train_steps), initial=initial_global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    def predict(batch, n=None):  # the recipe's forward, as a function so that held-out batches (n=None) reuse it
        latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        if args.prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=args.prediction_type)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        # [smplora] calibrated features (--privacy_preset robust): the same call with the LoRA off, no grad
        base_pred = reg.reference(unet, n, lambda: unet(  # [smplora]
            noisy_latents[:n], timesteps[:n], encoder_hidden_states[:n],  # [smplora]
            return_dict=False)[0]) if reg else None  # [smplora]
        return model_pred, target, base_pred, timesteps  # [smplora] base_pred: None unless calibrated

    for epoch in range(first_epoch, args.num_train_epochs):
        unet.train()
        train_loss = 0.0
        train_dataloader.set_epoch(epoch)
        if epoch == first_epoch and resume_batches:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        else:
            active_dataloader = train_dataloader
        for _step, batch in enumerate(active_dataloader):
            with accelerator.accumulate(unet):
                n = reg.privacy_rows(len(batch["pixel_values"])) if reg else 0  # [smplora] this step's privacy rows
                model_pred, target, base_pred, timesteps = predict(batch, n)  # [smplora] + n, base_pred

                if args.snr_gamma is None:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(
                        dim=1)[0]
                    if noise_scheduler.config.prediction_type == "epsilon":
                        mse_loss_weights = mse_loss_weights / snr
                    elif noise_scheduler.config.prediction_type == "v_prediction":
                        mse_loss_weights = mse_loss_weights / (snr + 1)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                    loss = loss.mean()

                if reg is not None:  # [smplora] member loss maps (before SNR weighting) + held-out ones
                    loss = reg.step(loss, reg.features(model_pred, target, rows=n, reference=base_pred),  # [smplora]
                                    reg.nonmember_features(lambda b: predict(b)[:3], rows=n),  # [smplora]
                                    update_attacker=accelerator.sync_gradients)  # [smplora]

                avg_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                accelerator.log({"train_loss": train_loss}, step=global_step)
                if reg is not None:  # [smplora]
                    accelerator.log(reg.log_dict(), step=global_step)  # [smplora] floats: attacker CE/acc, ...
                train_loss = 0.0

                if global_step % args.checkpointing_steps == 0:
                    if accelerator.is_main_process:
                        if args.checkpoints_total_limit is not None:
                            checkpoints = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")]
                            checkpoints = sorted(checkpoints, key=lambda x: int(x.split("-")[1]))
                            if len(checkpoints) >= args.checkpoints_total_limit:
                                num_to_remove = len(checkpoints) - args.checkpoints_total_limit + 1
                                for removing_checkpoint in checkpoints[0:num_to_remove]:
                                    shutil.rmtree(os.path.join(args.output_dir, removing_checkpoint))
                        save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                        accelerator.save_state(save_path)
                        logger.info(f"Saved state to {save_path}")

            logs = {"step_loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            if reg is not None:  # [smplora]
                logs.update(reg.progress_postfix())  # [smplora]
            progress_bar.set_postfix(**logs)

            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = unwrap_model(unet).to(torch.float32)
        unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(save_directory=args.output_dir,
                                                  unet_lora_layers=unet_lora_state_dict, safe_serialization=True)
        if reg is not None:  # [smplora]
            reg.annotate(os.path.join(args.output_dir, "pytorch_lora_weights.safetensors"))  # [smplora]
            reg.save(os.path.join(args.output_dir, "smplora_state.safetensors"))  # [smplora] for audits
            accelerator.print("smplora " + json.dumps(reg.metrics(), sort_keys=True))  # [smplora]

        if args.validation_prompt is not None:
            pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path,
                                                               revision=args.revision, variant=args.variant,
                                                               torch_dtype=weight_dtype, safety_checker=None)
            pipeline.load_lora_weights(args.output_dir)
            pipeline = pipeline.to(accelerator.device)
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
            for i in range(args.num_validation_images):
                image = pipeline(args.validation_prompt, num_inference_steps=args.num_inference_steps,
                                 height=args.resolution, width=args.resolution, generator=generator).images[0]
                image.save(os.path.join(args.output_dir, f"validation_{i}.png"))
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
