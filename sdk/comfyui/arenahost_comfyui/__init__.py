"""arenahost_comfyui: ComfyUI nodes over a running arenahost (see nodes.py)."""
