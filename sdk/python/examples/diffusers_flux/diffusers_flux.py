"""diffusers-flux: a real diffusers FluxPipeline on the host's NF4 Flux model (kind "pipeline").

Needs the torch environment (torch, diffusers): run the host with
ARENAHOST_PYTHON=.venv-torch/bin/python. See arenahost/diffusers_pipeline.py
for the parameters, the published latents and the result.
"""

from arenahost.diffusers_pipeline import plugin

if __name__ == "__main__":
    plugin.serve()
