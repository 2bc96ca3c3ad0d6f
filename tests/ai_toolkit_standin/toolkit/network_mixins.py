"""Stand-in of ai-toolkit's LoRA network: a low-rank adapter on the tiny UNet's conv, active only inside the
network's context (``with network:``) or while ``is_active`` is set, scaled by ``multiplier``."""

import torch
from safetensors.torch import load_file, save_file


class ToolkitNetworkMixin:
    def __init__(self, *args, **kwargs):
        self._multiplier = 1.0
        self.is_active: bool = False
        self.is_merged_in = False

    @property
    def multiplier(self):
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value):
        self._multiplier = value

    def __enter__(self):
        self.is_active = True

    def __exit__(self, exc_type, exc_value, tb):
        self.is_active = False

    def save_weights(self, file, dtype=torch.float16, metadata=None, extra_state_dict=None):
        save_dict = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        metadata = dict(metadata or {})
        metadata["sshs_model_hash"] = str(abs(hash(tuple(float(v.sum()) for v in save_dict.values()))))
        save_file(save_dict, file, metadata)

    def load_weights(self, file):
        self.load_state_dict(load_file(file))
        return None


class LoRASpecialNetwork(ToolkitNetworkMixin, torch.nn.Module):
    def __init__(self, channels=4, rank=2):
        torch.nn.Module.__init__(self)
        ToolkitNetworkMixin.__init__(self)
        self.lora_down = torch.nn.Conv2d(channels, rank, 1, bias=False)
        self.lora_up = torch.nn.Conv2d(rank, channels, 1, bias=False)
        torch.nn.init.normal_(self.lora_up.weight, std=0.01)

    def delta(self, x):
        if not self.is_active or self._multiplier == 0:
            return 0.0
        scale = self._multiplier if isinstance(self._multiplier, float) else \
            torch.tensor(self._multiplier, dtype=x.dtype).view(-1, 1, 1, 1)
        return self.lora_up(self.lora_down(x)) * scale
