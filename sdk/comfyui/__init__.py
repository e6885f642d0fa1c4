"""arenahost for ComfyUI: copy or link this folder into ComfyUI's custom_nodes/.

The nodes are clients of a running arenahost, built on its Python SDK
(``arenahost``: ``pip install -e sdk/python`` or the wheel). See README.md.
"""

from .arenahost_comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
