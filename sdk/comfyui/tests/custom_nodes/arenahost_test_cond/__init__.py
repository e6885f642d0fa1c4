"""Test-only ComfyUI node: fixed Flux conditioning without a text encoder.

Flux's text encoders (CLIP-L and T5-XXL, ~5B parameters) are far too large for
CI, so the tests' graphs take their CONDITIONING from this node: seeded
T5-shaped embeddings [1, tokens, 4096] and a CLIP-shaped pooled vector [768],
in exactly the structure CLIPTextEncode returns. Everything else in the
graphs (KSampler, latents, VAE decode, SaveImage) is ComfyUI's own.
"""

import torch


class ArenahostTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens):
        g = torch.Generator().manual_seed(int(seed))
        cond = torch.randn(1, int(tokens), 4096, generator=g) * 0.5
        pooled = torch.randn(1, 768, generator=g) * 0.5
        return ([[cond, {"pooled_output": pooled, "guidance": 3.5}]],)


NODE_CLASS_MAPPINGS = {"ArenahostTestConditioning": ArenahostTestConditioning}
