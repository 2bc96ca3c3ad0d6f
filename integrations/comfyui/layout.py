"""What the installed ComfyUI's training node looks like, read from its objects (never a version string).

ComfyUI's ``comfy_extras/nodes_train.py`` moves often: a97c9806 (2026-01-25) dropped *Train LoRA*'s
``model`` output and added ``bypass_mode``; later commits added ``checkpoint_depth``, ``offloading``,
``quantized_backward``, ``training_dtype="none"`` and a GradScaler. The pack reuses ComfyUI's own
training code, so before anything runs it reads the node's schema and the classes it subclasses,
and refuses, naming the range it was tested on, what it does not recognise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from smplora_plugin.errors import SmploraError

TESTED = ("3cd7b32f (2026-01-07, v0.8.0)", "783545f6 (2026-08-22, v0.33.0)")
SUPPORTED = f"ComfyUI {TESTED[0]} through {TESTED[1]}"
# What the pack uses of comfy_extras.nodes_train: classes and the methods it overrides or calls.
REQUIRED = {
    "TrainLoraNode": ("define_schema", "execute"),
    "TrainSampler": ("__init__", "fwd_bwd", "_train_step_standard_mode"),
    "TrainGuider": ("set_conds", "inner_set_conds"),
    "make_batch_extra_option_dict": (),
}
# fwd_bwd's parameters: the pack's sampler reads every one of them (both tested commits have these).
FWD_BWD = ("self", "model_wrap", "batch_sigmas", "batch_noise", "batch_latent", "cond", "indicies", "extra_args",
           "dataset_size", "bwd")
# Train LoRA's outputs the pack passes on, by ComfyUI type, and the output the newer node no longer has.
OUTPUT_TYPES = {"lora": "LORA_MODEL", "loss_map": "LOSS_MAP", "steps": "INT"}


class ComfyTrainingError(SmploraError, RuntimeError):
    """This ComfyUI's training module lacks what the SMP-LoRA node reuses, or has it in an unknown shape."""


@dataclass(frozen=True)
class TrainLayout:
    """Train LoRA as this ComfyUI has it: its input ids and where its outputs are."""

    inputs: Tuple[str, ...]
    outputs: Dict[str, int]          # "lora" / "loss_map" / "steps" -> index in TrainLoraNode's outputs
    model_output: Optional[int]      # index of the MODEL output (3cd7b32f); None since a97c9806

    @property
    def bucket_mode(self) -> bool:
        return "bucket_mode" in self.inputs

    @property
    def bypass_mode(self) -> bool:
        return "bypass_mode" in self.inputs

    def pick(self, args: Tuple[Any, ...]) -> Tuple[Any, Any, Any]:
        """``(lora, loss_map, steps)`` from TrainLoraNode.execute's output values."""
        if len(args) <= max(self.outputs.values()):
            raise ComfyTrainingError(f"Train LoRA returned {len(args)} value(s) where its schema declares "
                                     f"{max(self.outputs.values()) + 1} or more; {_range_hint()}")
        return tuple(args[self.outputs[k]] for k in ("lora", "loss_map", "steps"))


def _range_hint() -> str:
    return (f"the node pack supports {SUPPORTED} (docs/comfyui.md); update ComfyUI within that range, or "
            "update smplora-plugin if ComfyUI is newer.")


def _missing_parts(nodes_train: Any) -> List[str]:
    missing = []
    for name, attrs in REQUIRED.items():
        obj = getattr(nodes_train, name, None)
        if obj is None:
            missing.append(name)
            continue
        missing += [f"{name}.{a}" for a in attrs if not hasattr(obj, a)]
    fwd = getattr(getattr(nodes_train, "TrainSampler", None), "fwd_bwd", None)
    if fwd is not None:
        try:
            params = tuple(inspect.signature(fwd).parameters)
        except (TypeError, ValueError):
            params = ()
        if params != FWD_BWD:
            missing.append(f"TrainSampler.fwd_bwd{FWD_BWD[1:]} (it has {params[1:]})")
    return missing


def train_layout(nodes_train: Any) -> TrainLayout:
    """Read Train LoRA's layout from ``comfy_extras.nodes_train``; raise :class:`ComfyTrainingError` if unknown."""
    missing = _missing_parts(nodes_train)
    if missing:
        raise ComfyTrainingError(f"this ComfyUI's comfy_extras/nodes_train.py lacks {', '.join(missing)}: "
                                 + _range_hint())
    schema = nodes_train.TrainLoraNode.define_schema()
    inputs = tuple(i.id for i in schema.inputs)
    types = [getattr(o, "io_type", None) for o in schema.outputs]
    outputs, absent = {}, []
    for key, io_type in OUTPUT_TYPES.items():
        if types.count(io_type) != 1:
            absent.append(f"one {io_type} output ({key})")
        else:
            outputs[key] = types.index(io_type)
    need = ("model", "latents", "positive", "batch_size", "steps", "grad_accumulation_steps", "seed")
    absent += [f"input {n}" for n in need if n not in inputs]
    if absent:
        raise ComfyTrainingError(f"this ComfyUI's Train LoRA node has outputs {types} and inputs {list(inputs)}, "
                                 f"without {', '.join(absent)}: " + _range_hint())
    model_output = types.index("MODEL") if "MODEL" in types else None
    return TrainLayout(inputs=inputs, outputs=outputs, model_output=model_output)

