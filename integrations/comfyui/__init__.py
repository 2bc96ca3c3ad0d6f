"""ComfyUI node pack of smplora-plugin: SMP-LoRA training, saving, a privacy label and an audit as nodes.

ComfyUI loads a custom-node module's ``comfy_entrypoint``; this package is importable without
ComfyUI (nothing of ComfyUI is imported until the entry point runs), so it can be installed with
pip into ComfyUI's environment and exposed through a one-line ``custom_nodes`` file
(``examples/comfyui/custom_node/__init__.py``). See docs/comfyui.md.

Nodes (``node_id``: display name):

- ``SmploraTrainLora``: Train LoRA (SMP-LoRA), ComfyUI's own LoRA training with the privacy term;
- ``SmploraSaveLora``: Save LoRA (SMP-LoRA), the LoRA file with ``smplora.*`` header keys;
- ``SmploraLoraPrivacyLabel``: LoRA privacy label, what a file in ``models/loras`` says about privacy;
- ``SmploraAuditLora``: Audit LoRA, the membership-inference audit of a LoRA on a workflow's model.
"""

from __future__ import annotations

from typing import Any

from .label import privacy_label

NODE_IDS = ("SmploraTrainLora", "SmploraSaveLora", "SmploraLoraPrivacyLabel", "SmploraAuditLora")


async def comfy_entrypoint() -> Any:
    """ComfyUI's extension entry point: a ``ComfyExtension`` listing this pack's nodes."""
    from .nodes import SmploraExtension

    return SmploraExtension()


__all__ = ["NODE_IDS", "comfy_entrypoint", "privacy_label"]
