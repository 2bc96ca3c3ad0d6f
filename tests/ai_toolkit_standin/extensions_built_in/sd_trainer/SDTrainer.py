"""Stand-in of ai-toolkit's SDTrainer: one batch's forward (noise, timesteps, prompt, the primary prediction inside
the network's context), its loss by ai-toolkit's target rule, the backward, and one optimiser step per list."""

import torch
from jobs.process import BaseSDTrainProcess


class SDTrainer(BaseSDTrainProcess):
    def __init__(self, process_id: int, job, config, **kwargs):
        super().__init__(process_id, job, config, **kwargs)
        self.losses_seen = []

    def before_unet_predict(self):
        pass

    def after_unet_predict(self):
        pass

    def predict_noise(self, noisy_latents, timesteps=1, conditional_embeds=None, unconditional_embeds=None,
                      batch=None, is_primary_pred=False, **kwargs):
        return self.sd.predict_noise(latents=noisy_latents, conditional_embeddings=conditional_embeds,
                                     timestep=timesteps, batch=batch, **kwargs)

    def calculate_loss(self, noise_pred, noise, noisy_latents, timesteps, batch, mask_multiplier=1.0,
                       prior_pred=None, **kwargs):
        if prior_pred is not None and not self.train_config.do_prior_divergence:
            target = prior_pred
        elif self.sd.prediction_type == 'v_prediction':
            target = self.sd.noise_scheduler.get_velocity(batch.tensor, noise, timesteps)
        elif hasattr(self.sd, 'get_loss_target'):
            target = self.sd.get_loss_target(noise=noise, batch=batch, timesteps=timesteps).detach()
        elif self.sd.is_flow_matching:
            target = (noise - batch.latents).detach()
        else:
            target = noise
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float(), reduction="none")
        loss = loss.mean([1, 2, 3])
        multiplier = torch.tensor([self.train_config.reg_weight if f.is_reg else 1.0 for f in batch.file_items])
        return (loss * multiplier).mean()

    def train_single_accumulation(self, batch):
        with torch.no_grad():
            batch.latents = self.sd.encode_images(batch.tensor)
            noise = torch.randn_like(batch.latents)
            timesteps = torch.randint(0, 1000, (batch.latents.shape[0],))
            noisy_latents = self.sd.noise_scheduler.add_noise(batch.latents, noise, timesteps)
            conditional_embeds = self.sd.encode_prompt(batch.get_caption_list())
        network = self.network
        network.multiplier = batch.get_network_weight_list()
        with network:
            self.before_unet_predict()
            noise_pred = self.predict_noise(noisy_latents=noisy_latents, timesteps=timesteps,
                                            conditional_embeds=conditional_embeds, unconditional_embeds=None,
                                            batch=batch, is_primary_pred=True)
            self.after_unet_predict()
            loss = self.calculate_loss(noise_pred=noise_pred, noise=noise, noisy_latents=noisy_latents,
                                       timesteps=timesteps, batch=batch, mask_multiplier=1.0, prior_pred=None)
            self.losses_seen.append(float(loss.detach()))
            self.accelerator.backward(loss)
        return loss.detach()

    def hook_train_loop(self, batch):
        batch_list = batch if isinstance(batch, list) else [batch]
        total_loss = None
        self.optimizer.zero_grad()
        for batch in batch_list:
            loss = self.train_single_accumulation(batch)
            total_loss = loss if total_loss is None else total_loss + loss
        if not self.is_grad_accumulation_step:
            self.accelerator.clip_grad_norm_(self.params, self.train_config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {'loss': (total_loss / len(batch_list)).item()}
