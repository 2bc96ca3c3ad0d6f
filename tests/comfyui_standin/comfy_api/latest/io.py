"""Stand-in of comfy_api.latest.io: Schema, ComfyNode, NodeOutput and the input/output types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


class Input:
    def __init__(self, io_type: str, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 **extra: Any):
        self.io_type, self.id, self.display_name = io_type, id, display_name
        self.optional, self.tooltip = optional, tooltip
        self.extra = extra


class Output:
    def __init__(self, io_type: str, id: str = None, display_name: str = None, tooltip: str = None, **extra: Any):
        self.io_type, self.id, self.display_name, self.tooltip = io_type, id, display_name, tooltip


class _Type:
    io_type = "*"

    @classmethod
    def Input(cls, id: str, **kwargs: Any) -> Input:  # noqa: N802 (ComfyUI's spelling)
        return Input(cls.io_type, id, **kwargs)

    @classmethod
    def Output(cls, id: str = None, **kwargs: Any) -> Output:  # noqa: N802
        return Output(cls.io_type, id, **kwargs)


def _type(name: str) -> type:
    return type(name, (_Type,), {"io_type": name})


Boolean, Int, Float, String = _type("BOOLEAN"), _type("INT"), _type("FLOAT"), _type("STRING")
Image, Latent, Conditioning = _type("IMAGE"), _type("LATENT"), _type("CONDITIONING")
Clip, Vae, Model = _type("CLIP"), _type("VAE"), _type("MODEL")


class Combo(_Type):
    io_type = "COMBO"

    @classmethod
    def Input(cls, id: str, options: List[str] = (), **kwargs: Any) -> Input:  # noqa: N802
        inp = Input(cls.io_type, id, **kwargs)
        inp.options = list(options)
        return inp


def Custom(io_type: str) -> type:  # noqa: N802
    return _type(io_type)


class Hidden:
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: Optional[dict] = None, block_execution: str = None):
        self.args, self.ui = args, ui


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError
