"""Oracle for shared/lora: a real PEFT/diffusers Flux LoRA and diffusers' own outputs.

Builds a small FluxTransformer2DModel from a config (random weights, no
download; hidden 256 = 2 heads of 128, MLP 1024, 1 double + 1 single block),
attaches a PEFT LoRA adapter with random non-zero factors, saves it with
diffusers' save_lora_adapter (the PEFT-keyed file with lora_adapter_metadata),
loads it back into a fresh copy of the model with FluxPipeline.load_lora_weights, and for
every Linear layer of the model writes the fp32 base weight, a random input x
and the layer output y computed by diffusers with the LoRA active.

usage: peft_flux_lora.py OUT_DIR
writes OUT_DIR/lora.safetensors and OUT_DIR/oracle.safetensors
"""
import copy
import os
import sys

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)
cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
           num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
base = FluxTransformer2DModel(**cfg).float().eval()
with torch.no_grad():
    for p in base.parameters():
        p.normal_(0, 0.05)

train = copy.deepcopy(base)
targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
           "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm.linear", "norm_out.linear",
           "x_embedder", "context_embedder"]
train.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="default")
with torch.no_grad():
    for n, p in train.named_parameters():
        if "lora_" in n:
            p.normal_(0, 0.1)
# Save the way a pipeline does (keys "transformer.…", PEFT config in the
# lora_adapter_metadata header).
FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(train, adapter_name="default"),
                               transformer_lora_adapter_metadata=train.peft_config["default"].to_dict(),
                               weight_name="lora.safetensors")

# Load it the way users do: FluxPipeline.load_lora_weights (which reads the
# PEFT config from the file's metadata), on a pipeline holding only the
# transformer.
model = copy.deepcopy(base)
pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                    tokenizer_2=None, transformer=model)
pipe.load_lora_weights(os.path.join(out, "lora.safetensors"), adapter_name="default")
model.eval()
loaded = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
saved = len(get_peft_model_state_dict(train, adapter_name="default")) // 2
assert loaded == saved > 0, f"diffusers loaded {loaded} LoRA modules of {saved}"

tensors = {}
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, mod in model.named_modules():
        layer = getattr(mod, "base_layer", mod)
        if not isinstance(layer, torch.nn.Linear) or "lora_" in name or name.endswith(".base_layer"):
            continue
        x = torch.randn(3, layer.in_features, generator=g)
        tensors[name + ".weight"] = layer.weight.detach().float().contiguous()
        tensors[name + ".bias"] = layer.bias.detach().float().contiguous()
        tensors[name + ".x"] = x
        tensors[name + ".y"] = mod(x).detach().float().contiguous()
save_file(tensors, os.path.join(out, "oracle.safetensors"))
print(len(tensors) // 4, "layers")
