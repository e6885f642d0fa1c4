"""reference-pipeline: the NumPy reference pipeline plugin (kind "pipeline").

It runs a denoising-like loop on the host's NF4 model weights and publishes
each step's latent. It exercises the plumbing; it is not a trained model.
See arenahost/pipelines/reference.py for the parameters and the arithmetic.
"""

from arenahost.pipelines.reference import plugin

if __name__ == "__main__":
    plugin.serve()
