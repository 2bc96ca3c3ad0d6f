"""Stand-in of ai-toolkit's StableDiffusion: a tiny random latent model (the "VAE" pools RGB to 4 latent
channels at half size, the "text encoder" embeds a caption's characters, the "UNet" is two convolutions) and
an epsilon-prediction noise schedule."""

import torch

from toolkit.prompt_utils import PromptEmbeds


class TinyScheduler:
    prediction_type = "epsilon"

    def add_noise(self, latents, noise, timesteps):
        a = (1.0 - timesteps.float() / 1000.0).view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def get_velocity(self, sample, noise, timesteps):
        a = (1.0 - timesteps.float() / 1000.0).view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * sample


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)
        self.text = torch.nn.Linear(8, 8)
        self.network = None

    def forward(self, x, t, text):
        h = torch.nn.functional.silu(self.conv_in(x) + self.text(text)[:, :, None, None]
                                     + (t.float() / 1000.0).view(-1, 1, 1, 1))
        out = self.conv_out(h)
        if self.network is not None:
            out = out + self.network.delta(x)
        return out


class StableDiffusion:
    is_flow_matching = False
    is_xl = False

    def __init__(self, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.device_torch = torch.device(device)
        self.unet = TinyUNet()
        for p in self.unet.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        self.unet.requires_grad_(False)
        self.embedding = torch.randn(256, 8, generator=gen) * 0.5
        self.noise_scheduler = TinyScheduler()
        self.prediction_type = "epsilon"
        self.network = None

    def encode_images(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def encode_prompt(self, prompts):
        rows = [self.embedding[[ord(c) % 256 for c in (p or " ")]].mean(0) for p in prompts]
        return PromptEmbeds(torch.stack(rows))

    def predict_noise(self, latents, conditional_embeddings, timestep, batch=None, **kwargs):
        if conditional_embeddings.text_embeds.shape[0] != latents.shape[0]:
            raise ValueError("Batch size of latents must be the same as the batch size of text embeddings")
        return self.unet(latents, timestep, conditional_embeddings.text_embeds)
