"""Baseline for bench/lora: the path UIs use today to fuse LoRAs into a
bitsandbytes NF4 model, run for real on the CPU.

Loads the NF4 checkpoint into bitsandbytes Linear4bit layers (the stored
packed codes and quant state, as from_prequantized does for a saved model),
injects one PEFT LoRA adapter per kohya file (lora_down/lora_up/alpha mapped
to lora_A/lora_B with lora_alpha, r from the file), and times PEFT's merge
(peft/tuners/lora/bnb.py Linear4bit.merge: dequantize the whole weight, add
the deltas, re-quantize) and unmerge, with the peak RSS each adds.

  peft_baseline.py MODEL.safetensors LORA1.safetensors [LORA2 ...] --sets 1,5

prints one JSON object: {"fuse1": {...}, "fuse5": {...}, "unfuse5": {...}}
with seconds, peak extra RSS bytes and, for unfuse, whether the packed
bytes came back exactly.
"""
import argparse
import json
import os
import re
import time

import torch
import bitsandbytes as bnb
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

torch.set_grad_enabled(False)


def rss_fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(fn):
    reset_peak()
    before = rss_fields()["VmRSS"]
    t = time.perf_counter()
    fn()
    took = time.perf_counter() - t
    return {"seconds": took, "peak_extra_bytes": max(0, rss_fields()["VmHWM"] - before)}


def build_model(path):
    sd = load_file(path)
    model = torch.nn.Module()
    # PEFT dispatches bitsandbytes' Linear4bit to its bnb LoRA layer (whose
    # merge dequantizes, adds and re-quantizes) only on a model marked as
    # loaded in 4 bit, as transformers/diffusers mark quantized models.
    model.is_loaded_in_4bit = True
    suffix = ".quant_state.bitsandbytes__nf4"
    names = [k[: -len(suffix)] for k in sd if k.endswith(suffix)]
    for wname in names:
        mod = wname[: -len(".weight")]
        stats = {k[len(wname) + 1:]: v for k, v in sd.items() if k.startswith(wname + ".")}
        qs = json.loads(bytes(stats[suffix[1:]].tolist()).decode())
        out_f, in_f = qs["shape"]
        bias = sd.get(mod + ".bias")
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
        lin.weight = bnb.nn.Params4bit.from_prequantized(sd[wname], stats, requires_grad=False, device="cpu", module=lin)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
        parent = model
        parts = mod.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], lin)
    return model, names


def kohya_to_module(key, modules):
    # lora_unet_double_blocks_0_img_attn_qkv → double_blocks.0.img_attn.qkv,
    # resolved against the model's own module names (kohya flattening is lossy).
    flat = key[len("lora_unet_"):]
    return modules.get(flat)


def load_adapter(model, path, name, modules):
    with safe_open(path, "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    targets, rank, alpha = {}, None, None
    for k in ts:
        if k.endswith(".lora_down.weight"):
            key = k[: -len(".lora_down.weight")]
            mod = kohya_to_module(key, modules)
            if mod is None:
                raise SystemExit(f"{path}: key {key}: no module")
            targets[mod] = key
            rank = ts[k].shape[0]
            alpha = float(ts[key + ".alpha"]) if key + ".alpha" in ts else float(rank)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0, init_lora_weights=False)
    inject_adapter_in_model(cfg, model, adapter_name=name)
    mods = dict(model.named_modules())
    for mod, key in targets.items():
        layer = mods[mod]
        layer.lora_A[name].weight.copy_(ts[key + ".lora_down.weight"].float())
        layer.lora_B[name].weight.copy_(ts[key + ".lora_up.weight"].float())
    return len(targets)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def packed_bytes(model, names):
    mods = dict(model.named_modules())
    out = {}
    for w in names:
        m = mods[w[: -len(".weight")]]
        m = getattr(m, "base_layer", m)
        out[w] = m.weight.data.clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("loras", nargs="+")
    ap.add_argument("--sets", default="1,5")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, names = build_model(a.model)
    modules = {n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    res = {}
    adapters = []
    for i, p in enumerate(a.loras):
        load_adapter(model, p, f"l{i}", modules)
        adapters.append(f"l{i}")
    orig = packed_bytes(model, names)
    for n in [int(x) for x in a.sets.split(",")]:
        use = adapters[:n]

        def merge():
            for m in lora_layers(model):
                m.merge(adapter_names=use)

        def unmerge():
            for m in lora_layers(model):
                m.unmerge()

        res[f"fuse{n}"] = measure(merge)
        r = measure(unmerge)
        now = packed_bytes(model, names)
        r["byte_exact"] = all(torch.equal(orig[w], now[w]) for w in names)
        res[f"unfuse{n}"] = r
        # Start the next set from the original bytes, as a UI reloading the model would.
        model, names = build_model(a.model)
        for i, p in enumerate(a.loras):
            load_adapter(model, p, f"l{i}", modules)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
