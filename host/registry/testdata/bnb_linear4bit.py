"""Write bitsandbytes' own serialization of Linear4bit layers (CPU backend).

  bnb_linear4bit.py OUT_DIR

writes OUT_DIR/nested.safetensors (compress_statistics=True) and
OUT_DIR/plain.safetensors (compress_statistics=False): the state_dict() of a
small model of nf4 Linear4bit layers (odd element counts, blocksize 64 and
128, with and without bias) and one plain float layer, saved with
safetensors.torch.save_file exactly as users do.
"""
import os
import sys

import torch
import bitsandbytes as bnb
from safetensors.torch import save_file


def build(nested):
    torch.manual_seed(1234 + nested)
    model = torch.nn.Module()
    layers = [
        ("blocks.0.attn.qkv", 64, 96, True, 64),
        ("blocks.0.mlp.fc1", 48, 33, False, 64),   # 1584 elements: a partial last block
        ("blocks.1.proj", 37, 7, True, 128),       # 259 elements: odd count
    ]
    for name, fin, fout, bias, bs in layers:
        lin = torch.nn.Linear(fin, fout, bias=bias, dtype=torch.bfloat16)
        q = bnb.nn.Linear4bit(fin, fout, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=nested, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                     compress_statistics=nested, quant_type="nf4",
                                     blocksize=bs)
        if bias:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to("cpu")
        parent = model
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], q)
    model.add_module("norm", torch.nn.LayerNorm(16, dtype=torch.float32))
    return model


def main(out):
    for nested, fname in ((True, "nested.safetensors"), (False, "plain.safetensors")):
        sd = build(nested).state_dict()
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, os.path.join(out, fname))


if __name__ == "__main__":
    main(sys.argv[1])
