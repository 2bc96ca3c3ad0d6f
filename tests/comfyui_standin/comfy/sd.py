"""Stand-in of comfy.sd: load_lora_for_models."""

from . import lora as _lora
from . import lora_convert


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, lora_metadata=None):
    key_map = {}
    if model is not None:
        key_map = _lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = _lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = _lora.load_lora(lora_convert.convert_lora(lora), key_map)
    new_model = new_clip = None
    if model is not None:
        new_model = model.clone()
        new_model.add_patches({k: v for k, v in loaded.items() if k.startswith("diffusion_model.")}, strength_model)
    if clip is not None:
        new_clip = clip.clone()
        new_clip.add_patches(loaded, strength_clip)
    return new_model, new_clip
