"""Stand-in of ai-toolkit's accelerate wrapper: one CPU process."""

import contextlib

import torch


class StandinAccelerator:
    num_processes = 1
    process_index = 0
    is_main_process = True
    is_local_main_process = True
    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


_ACC = None


def get_accelerator():
    global _ACC
    if _ACC is None:
        _ACC = StandinAccelerator()
    return _ACC
