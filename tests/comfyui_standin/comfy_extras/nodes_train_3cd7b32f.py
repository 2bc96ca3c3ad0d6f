"""Stand-in of comfy_extras/nodes_train.py at ComfyUI 3cd7b32f (2026-01-07, v0.8.0): the older layout.

Train LoRA returned ``(model, lora, loss_map, steps)`` and had no ``quantized_backward``,
``checkpoint_depth``, ``offloading`` or ``bypass_mode`` inputs; ``TrainSampler`` had no GradScaler
and ``TrainGuider`` no ``offloading``. ``StandinComfy(base, layout="3cd7b32f")`` puts this module in
place of ``comfy_extras.nodes_train``.
"""

from __future__ import annotations

import torch

from comfy_api.latest import io
from comfy_extras import nodes_train as _current
from comfy_extras.nodes_train import PBARS, SAMPLERS, make_batch_extra_option_dict  # noqa: F401 (the module's API)


class TrainGuider(_current.TrainGuider):
    def __init__(self, model_patcher):
        super().__init__(model_patcher)


class TrainSampler(_current.TrainSampler):
    def __init__(self, loss_fn, optimizer, loss_callback=None, batch_size=1, grad_acc=1, total_steps=1, seed=0,
                 training_dtype=torch.bfloat16, real_dataset=None, bucket_latents=None):
        super().__init__(loss_fn, optimizer, loss_callback=loss_callback, batch_size=batch_size, grad_acc=grad_acc,
                         total_steps=total_steps, seed=seed, training_dtype=training_dtype, real_dataset=real_dataset,
                         bucket_latents=bucket_latents)


class TrainLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = [i for i in _current.TrainLoraNode.define_schema().inputs
                  if i.id not in ("quantized_backward", "checkpoint_depth", "offloading", "bypass_mode")]
        for i in inputs:
            if i.id == "training_dtype":
                i.options = ["bf16", "fp32"]
        return io.Schema(node_id="TrainLoraNode", display_name="Train LoRA", category="training", is_experimental=True,
                         is_input_list=True, inputs=inputs,
                         outputs=[io.Model.Output(display_name="model"),
                                  io.Custom("LORA_MODEL").Output(display_name="lora"),
                                  io.Custom("LOSS_MAP").Output(display_name="loss_map"),
                                  io.Int.Output(display_name="steps")])

    @classmethod
    def execute(cls, model, latents, positive, batch_size, steps, grad_accumulation_steps, learning_rate, rank,
                optimizer, loss_function, seed, training_dtype, lora_dtype, algorithm, gradient_checkpointing,
                existing_lora, bucket_mode):
        mp, lora_sd, loss_map = _train(model[0], latents, positive, batch_size[0], steps[0],
                                       grad_accumulation_steps[0], learning_rate[0], rank[0], optimizer[0],
                                       loss_function[0], seed[0], training_dtype[0], lora_dtype[0], existing_lora[0],
                                       bucket_mode[0])
        return io.NodeOutput(mp, lora_sd, loss_map, steps[0])


def _train(*args, **kwargs):
    """The shared training body, run with this module's sampler and guider (as the old node used its own)."""
    saved = _current.TrainSampler, _current.TrainGuider
    mine = globals()["TrainSampler"], globals()["TrainGuider"]
    _current.TrainSampler, _current.TrainGuider = mine
    try:
        return _current.train(*args, **kwargs)
    finally:
        _current.TrainSampler, _current.TrainGuider = saved
