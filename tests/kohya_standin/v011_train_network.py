"""Stand-in for the trainer layout of sd-scripts v0.11 (v0.11.1, 6721028), as its pull requests describe it:
the header is built by ``_build_metadata()`` (still calling ``update_metadata``, #2353) into ``self._metadata`` /
``self._minimum_metadata``, checkpoints are saved and removed by ``_save_model()`` / ``_remove_model()`` methods
instead of closures in ``train()`` (#2356), and the epoch validation runs in ``_run_validation_loop()``, which calls
``on_step_start`` before it assigns the validation timestep (#2355). The loop is the one of ``train_network.py``
(same model, datasets, hooks and order); only these pieces moved. No sd-scripts code is copied."""

import io
import math
import os
import random
import time

import torch
from accelerate import Accelerator
from tqdm import tqdm

import train_network
from library import config_util, train_util


class V011NetworkTrainer(train_network.NetworkTrainer):
    def _build_metadata(self, args, train_group, val_group, use_user_config, num_processes):
        metadata = {"ss_session_id": random.randint(0, 2**31), "ss_training_started_at": time.time(),
                    "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate,
                    "ss_network_dim": args.network_dim, "ss_num_train_images": train_group.num_train_images,
                    "ss_num_reg_images": train_group.num_reg_images,
                    "ss_num_validation_images": val_group.num_train_images if val_group is not None else 0,
                    "ss_validation_split": args.validation_split, "ss_validation_seed": args.validation_seed,
                    "ss_validate_every_n_epochs": args.validate_every_n_epochs}
        self.update_metadata(metadata, args)
        metadata.update(train_network.dataset_metadata(use_user_config, train_group, args, num_processes))
        self._metadata = {k: str(v) for k, v in metadata.items()}
        self._minimum_metadata = {k: self._metadata[k] for k in ("ss_output_name",)}

    def _save_model(self, args, ckpt_name, unwrapped_nw, steps, epoch_no):
        os.makedirs(args.output_dir, exist_ok=True)
        self._metadata["ss_steps"] = str(steps)
        self._metadata["ss_epoch"] = str(epoch_no)
        to_save = self._minimum_metadata if args.no_metadata else self._metadata
        to_save.update(self.get_sai_model_spec(args))
        unwrapped_nw.save_weights(os.path.join(args.output_dir, ckpt_name), None, to_save)

    def _remove_model(self, args, old_ckpt_name):
        old = os.path.join(args.output_dir, old_ckpt_name)
        if os.path.exists(old):
            os.remove(old)

    def _run_validation_loop(self, args, accelerator, network, text_encoders, unet, vae, noise_scheduler, val_loader,
                             weight_dtype, epoch):
        every = args.validate_every_n_epochs   # None validates at the end of every epoch
        if len(val_loader) == 0 or not (every is None or (epoch + 1) % every == 0):
            return
        accelerator.unwrap_model(network).eval()
        for batch in val_loader:
            self.validation_batches += 1
            self.on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=False)
            self._validation_timestep = 500   # (#2355) assigned after on_step_start; the stand-in draws its own
            self.process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, weight_dtype, weight_dtype,
                               accelerator, args, None, None, is_train=False, train_text_encoder=False, train_unet=True)
            self.on_validation_step_end(args, accelerator, network, text_encoders, unet, batch, weight_dtype)
        accelerator.unwrap_model(network).train()

    def train(self, args):
        use_user_config = args.dataset_config is not None
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
            return
        self.assert_extra_args(args, train_group, val_group)

        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=True,
                                  mixed_precision=args.mixed_precision)
        weight_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        _, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
        text_encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]
        unet.requires_grad_(False)
        unet.to(dtype=weight_dtype)
        torch.manual_seed(args.seed)
        network = train_network.TinyLoRANetwork(args.network_dim or 4)
        self._network = network
        self.post_process_network(args, accelerator, network, text_encoders, unet)
        optimizer = torch.optim.AdamW(network.parameters(), lr=args.learning_rate)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        g = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(train_group, batch_size=1, shuffle=True, generator=g,
                                                   collate_fn=lambda xs: xs[0])
        val_loader = torch.utils.data.DataLoader(val_group if val_group is not None else [], batch_size=1,
                                                 shuffle=False, collate_fn=lambda xs: xs[0])
        network, optimizer, train_loader, lr_scheduler = accelerator.prepare(network, optimizer, train_loader, lr_scheduler)
        self._network = network
        noise_scheduler = self.get_noise_scheduler(args, accelerator.device)
        if args.resume:
            accelerator.load_state(args.resume)
        self._build_metadata(args, train_group, val_group, use_user_config, accelerator.num_processes)

        num_epochs = math.ceil(args.max_train_steps / max(1, len(train_loader) // args.gradient_accumulation_steps))
        progress_bar = tqdm(range(args.max_train_steps), desc="steps", disable=not accelerator.is_local_main_process,
                            file=None if args.progress else io.StringIO())
        global_step, losses = 0, []
        for epoch in range(num_epochs):
            accelerator.unwrap_model(network).on_epoch_start(text_encoder, unet)
            for batch in train_loader:
                with accelerator.accumulate(network):
                    self.on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=True)
                    loss = self.process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, weight_dtype,
                                              weight_dtype, accelerator, args, None, None, is_train=True,
                                              train_text_encoder=False, train_unet=True)
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    progress_bar.update(1)
                    global_step += 1
                    if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                        self._save_model(args, f"{args.output_name}-step{global_step:08d}.safetensors",
                                         accelerator.unwrap_model(network), global_step, epoch)
                        if args.save_state:
                            accelerator.save_state(os.path.join(args.output_dir,
                                                                f"{args.output_name}-step{global_step:08d}-state"))
                current_loss = loss.detach().item()
                losses.append(current_loss)
                avr_loss = sum(losses[-10:]) / len(losses[-10:])
                progress_bar.set_postfix(avr_loss=avr_loss)
                self.step_logs.append(self.generate_step_logs(args, current_loss, avr_loss, lr_scheduler, None, optimizer))
                if global_step >= args.max_train_steps:
                    break
            self._run_validation_loop(args, accelerator, network, text_encoders, unet, vae, noise_scheduler, val_loader,
                                      weight_dtype, epoch)
            if global_step >= args.max_train_steps:
                break
        progress_bar.close()
        if args.save_state:
            accelerator.save_state(os.path.join(args.output_dir, f"{args.output_name}-state"))
        self._save_model(args, f"{args.output_name}.safetensors", accelerator.unwrap_model(network), global_step,
                         num_epochs)
        self.final_global_step = global_step


def setup_parser():
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = V011NetworkTrainer()
    trainer.train(args)
