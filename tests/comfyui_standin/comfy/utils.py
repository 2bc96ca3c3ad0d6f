"""Stand-in of comfy.utils."""

PROGRESS_BAR_ENABLED = False


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    from safetensors.torch import load_file

    return load_file(ckpt)


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update(self, value):
        self.current += value
