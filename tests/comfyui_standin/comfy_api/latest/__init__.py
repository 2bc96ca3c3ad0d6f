"""Stand-in of comfy_api.latest: the V3 node API names the pack uses."""

from . import io, ui

__all__ = ["ComfyExtension", "io", "ui"]


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self):
        raise NotImplementedError
