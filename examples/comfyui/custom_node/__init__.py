"""ComfyUI custom-node entry of smplora-plugin.

Link or copy this folder into ``ComfyUI/custom_nodes/`` (e.g. as ``custom_nodes/smplora``) after
``pip install "smplora-plugin[audit]"`` in ComfyUI's Python; ComfyUI then loads the node pack's
``comfy_entrypoint`` (docs/comfyui.md).
"""

from smplora_plugin.integrations.comfyui import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
