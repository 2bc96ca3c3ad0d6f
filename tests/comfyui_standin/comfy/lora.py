"""Stand-in of comfy.lora: key maps and LoRA loading (regular lora_up/lora_down, diff and diff_b)."""

from .standin_model import LoRAAdapter


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 (ComfyUI's own signature)
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map[k[:-len(".weight")]] = k
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006 (ComfyUI's own signature)
    for k in model.state_dict():
        key_map[f"clip.{k}"] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):
    out = {}
    for x, key in to_load.items():
        up = lora.get(f"{x}.lora_up.weight")
        if up is not None:
            alpha = lora.get(f"{x}.alpha")
            out[key] = LoRAAdapter((up, lora[f"{x}.lora_down.weight"], None if alpha is None else float(alpha), None))
        if f"{x}.diff" in lora:
            out[key] = ("diff", (lora[f"{x}.diff"],))
        if f"{x}.diff_b" in lora and key.endswith(".weight"):
            out[key[:-len(".weight")] + ".bias"] = ("diff", (lora[f"{x}.diff_b"],))
    return out
