"""Stand-in of comfy.model_management: one patcher applied per model at a time."""

_CURRENT = {}


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for patcher in models:
        key = id(patcher.model)
        current = _CURRENT.get(key)
        if current is patcher:
            continue
        if current is not None:
            current.unpatch_model()
        patcher.patch_model()
        _CURRENT[key] = patcher


def get_torch_device():
    import torch

    return torch.device("cpu")
