"""Oracle for a fused text-encoder LoRA on a bundled file's plain encoder
weights (CLIP-L F16, T5 F8_E4M3, ...): for every encoder weight a kohya
module of the LoRA names, torch computes

    delta  = (strength * alpha / rank * up.double() @ down.double()).float()
    merged = (w.float() + delta).to(w.dtype)

and writes, into OUTDIR, <key>.delta (float32, little-endian) and
<key>.merged (the merged tensor's bytes in w's dtype), plus manifest.json
listing {key: dtype}.

usage: te_fuse_oracle.py BUNDLE LORA STRENGTH OUTDIR
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file

bundle, lora_path, strength, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
model = load_file(bundle)
lora = load_file(lora_path)
prefixes = {"text_encoders.clip_l.transformer.": "lora_te1_", "text_encoders.t5xxl.transformer.": "lora_te3_"}
manifest = {}
for key, w in model.items():
    if w.dim() != 2 or not key.endswith(".weight"):
        continue
    for pre, kohya in prefixes.items():
        if key.startswith(pre):
            mod = kohya + key[len(pre):-len(".weight")].replace(".", "_")
            break
    else:
        continue
    if mod + ".lora_down.weight" not in lora:
        continue
    down, up = lora[mod + ".lora_down.weight"].double(), lora[mod + ".lora_up.weight"].double()
    rank = down.shape[0]
    alpha = float(lora[mod + ".alpha"]) if mod + ".alpha" in lora else rank
    delta = (strength * alpha / rank * (up @ down)).float()
    merged = (w.float() + delta).to(w.dtype)
    delta.numpy().astype("<f4").tofile(os.path.join(out, key + ".delta"))
    merged.contiguous().view(torch.uint8).numpy().tofile(os.path.join(out, key + ".merged"))
    manifest[key] = str(w.dtype).removeprefix("torch.")
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f)
print(len(manifest))
