"""Stand-in for the trainer layout of sd-scripts v0.11 (v0.11.1, 6721028), as its pull requests describe it:
the header is built by ``_build_metadata()`` (still calling ``update_metadata``, #2353) into ``self._metadata`` /
``self._minimum_metadata``, checkpoints are saved and removed by ``_save_model()`` / ``_remove_model()`` methods
instead of closures in ``train()`` (#2356), and the epoch validation runs in ``_run_validation_loop()``, which calls
``on_step_start`` before it assigns the validation timestep (#2355). The loop is the one of ``train_network.py``
(same model, datasets, hooks and order, built from its pieces); only these pieces moved. No sd-scripts code is
copied."""

import os
import random

import train_network

from library import train_util


class V011NetworkTrainer(train_network.NetworkTrainer):
    def _build_metadata(self, args, train_group, val_group, use_user_config, num_processes):
        metadata = {"ss_session_id": random.randint(0, 2**31),
                    **train_network.run_metadata(args, train_group, val_group)}
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
        r = self._prepare_training(args)
        if r is None:
            return
        accelerator = r.accelerator
        if args.resume:
            accelerator.load_state(args.resume)
        self._build_metadata(args, r.train_group, r.val_group, use_user_config, accelerator.num_processes)

        def validate(r, epoch):
            self._run_validation_loop(args, accelerator, r.network, r.text_encoders, r.unet, r.vae, r.noise_scheduler,
                                      r.val_loader, r.weight_dtype, epoch)

        for epoch, batch in self._training_batches(r, validate):
            with accelerator.accumulate(r.network):
                self.on_step_start(args, accelerator, r.network, r.text_encoders, r.unet, batch, r.weight_dtype,
                                   is_train=True)
                loss = self._optimize(r, batch)
            if self._step_done(r) and args.save_every_n_steps and r.global_step % args.save_every_n_steps == 0:
                self._save_model(args, f"{args.output_name}-step{r.global_step:08d}.safetensors",
                                 accelerator.unwrap_model(r.network), r.global_step, epoch)
                r.save_state(f"-step{r.global_step:08d}")
            self._log_step(r, loss)
        r.save_state("")
        self._save_model(args, f"{args.output_name}.safetensors", accelerator.unwrap_model(r.network), r.global_step,
                         r.num_epochs)
        self.final_global_step = r.global_step


def setup_parser():
    return train_network.setup_parser()


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = V011NetworkTrainer()
    trainer.train(args)
