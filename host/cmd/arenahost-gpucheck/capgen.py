"""The GPU check's capped-generation step, Python side (arenahost-gpucheck's capgen step runs it).

usage:
  capgen.py fixture --out DIR --flux JSON [--vae full|small] [--seed N]
  capgen.py baseline --model-dir DIR --checkpoint FILE --configs JSON --cap-bytes N
                     [--size 1024] [--steps 8] [--dtype bfloat16] [--stand-in-tokens 512] [--device cuda:0] [--deadline UNIX]

``fixture`` writes a diffusers FluxPipeline folder for the Flux shape in --flux
(layout.FluxConfig as JSON: hidden, head_dim, mlp, in_channels, context_dim,
vec_dim, double_blocks, single_blocks, guidance): model_index.json without text
encoders (prompts are stand-in embeddings of the real shapes), the
transformer's config.json (no weights: they come from the arena), FLUX.1-dev's
scheduler settings and an AutoencoderKL with seeded random weights: FLUX.1's
VAE architecture with --vae full (16 latent channels, 128/256/512/512, two
layers per block), a small one with --vae small.

``baseline`` is what the issue compares with, under the same device-memory
cap: a diffusers FluxPipeline on that folder whose transformer's Linears are
bitsandbytes ``Linear4bit`` holding the checkpoint's NF4 codes (random codes at
Flux-dev's shapes; norm scales 1), with the kohya LoRAs loaded as PEFT adapters
(``load_lora_weights``) and left unmerged, or merged with ``fuse_lora`` (then
``unload_lora_weights``; the transformer is rebuilt after a fused config). The
process caps its own torch allocator at --cap-bytes
(``torch.cuda.set_per_process_memory_fraction``). For each config of --configs
(a JSON list of {"loras": [paths], "rank": r, "mode": "unmerged"|"fuse"}) it
prints one JSON line: apply_s (reading the kohya files into diffusers keys
(:func:`peft_state`) + load_lora_weights + set_adapters [+ fuse_lora],
wall), step_ms (median of the steps after the first), peak_bytes
(torch.cuda.max_memory_reserved; 0 on the CPU), oom, error. Configs not started
before --deadline are printed with "skipped": the GPU check's time budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "sdk" / "python"))

SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def transformer_config(f: dict) -> dict:
    hd = f["head_dim"]
    rope = [16, 56, 56] if hd == 128 else [hd // 8, hd * 7 // 16, hd * 7 // 16]
    assert sum(rope) == hd, f"no RoPE split for head_dim {hd}"
    return dict(patch_size=1, in_channels=f["in_channels"], num_layers=f["double_blocks"], num_single_layers=f["single_blocks"],
                attention_head_dim=hd, num_attention_heads=f["hidden"] // hd, joint_attention_dim=f["context_dim"],
                pooled_projection_dim=f["vec_dim"], guidance_embeds=bool(f["guidance"]), axes_dims_rope=rope)


def fixture(a) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    out = Path(a.out)
    f = json.loads(a.flux)
    if f["mlp"] != 4 * f["hidden"]:
        raise SystemExit(f"capgen fixture: mlp {f['mlp']} is not 4 × hidden {f['hidden']}: diffusers' Flux has mlp_ratio 4")
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "FluxTransformer2DModel", **transformer_config(f)}
    (out / "transformer" / "config.json").write_text(json.dumps(cfg, indent=1))
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(str(out / "scheduler"))
    full = a.vae == "full"
    torch.manual_seed(a.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=(128, 256, 512, 512) if full else (32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2 if full else 1, norm_num_groups=32, sample_size=1024 if full else 256,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # small weights: a random VAE of this depth must not overflow bf16
        for p in vae.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    idx = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": [None, None], "tokenizer": [None, None], "text_encoder_2": [None, None], "tokenizer_2": [None, None]}
    (out / "model_index.json").write_text(json.dumps(idx, indent=1))
    print(json.dumps({"ok": True, "dir": str(out), "vae_params": sum(p.numel() for p in vae.parameters())}))


def bnb_transformer(model_dir: str, checkpoint: str, dtype, device: str):
    """FluxTransformer2DModel from the folder's config, its Linears bnb Linear4bit with the checkpoint's codes."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from arenahost.diffusers_flux import flux_layer_map

    cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    cfg.pop("_class_name", None)
    with torch.device("meta"):
        t = FluxTransformer2DModel(**cfg)
    sd = load_file(checkpoint)
    by_weight: dict[str, dict] = {}
    for k, v in sd.items():
        w, sep, rest = k.partition(".weight.")
        if sep:
            by_weight.setdefault(w + ".weight", {})[rest] = v
    lmap = flux_layer_map(t, "flux-bfl")
    plain = 0

    def put(name, mod):
        parent, _, attr = name.rpartition(".")
        pm = t.get_submodule(parent) if parent else t
        if attr.isdigit():
            pm[int(attr)] = mod
        else:
            setattr(pm, attr, mod)

    for name, mod in list(t.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        src, rows = lmap.get(name, (None, None))
        qs = by_weight.get(f"{src}.weight") if src else None
        if qs is None or "quant_state.bitsandbytes__nf4" not in qs:
            # Stored unquantized (or not at all): a plain Linear with the checkpoint's rows when it has them.
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="cpu")
            w, bias = sd.get(f"{src}.weight") if src else None, sd.get(f"{src}.bias") if src else None
            sel = (lambda x: torch.cat([x[r0: r0 + n] for r0, n in rows])) if rows else (lambda x: x)
            with torch.no_grad():
                if w is not None and w.dim() == 2 and w.shape[1] == mod.in_features:
                    lin.weight.copy_(sel(w))
                else:
                    torch.nn.init.normal_(lin.weight, std=0.02 / mod.in_features ** 0.5)
                if lin.bias is not None:
                    lin.bias.copy_(sel(bias)) if bias is not None else torch.nn.init.zeros_(lin.bias)
            put(name, lin.to(dtype))
            plain += 1
            continue
        st = F.QuantState.from_dict(qs, device="cpu")
        in_f = st.shape[1]
        packed = sd[f"{src}.weight"].reshape(-1)
        parts_p, parts_a, parts_b = [], [], []
        bias = sd.get(f"{src}.bias")
        for r0, n in rows or [(0, st.shape[0])]:
            e0, e1 = r0 * in_f, (r0 + n) * in_f
            parts_p.append(packed[e0 // 2: e1 // 2])
            parts_a.append(st.absmax[e0 // st.blocksize: e1 // st.blocksize])
            if bias is not None:
                parts_b.append(bias[r0: r0 + n])
        q = F.QuantState(absmax=torch.cat(parts_a), shape=torch.Size([mod.out_features, in_f]), code=st.code,
                         blocksize=st.blocksize, quant_type=st.quant_type, dtype=dtype)
        with torch.device("meta"):
            lin = bnb.nn.Linear4bit(in_f, mod.out_features, bias=False, compute_dtype=dtype, quant_type=st.quant_type)
        lin.weight = bnb.nn.Params4bit(torch.cat(parts_p).reshape(-1, 1), requires_grad=False, quant_state=q,
                                       quant_type=st.quant_type, blocksize=st.blocksize, compress_statistics=False,
                                       bnb_quantized=True, module=lin)
        lin.bias = torch.nn.Parameter(torch.cat(parts_b).to(dtype), requires_grad=False) if parts_b else None
        put(name, lin)
    # Whatever is still on the meta device (norm scales, the rare unquantized parameter): ones.
    for mname, m in list(t.named_modules()):
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, pname, torch.nn.Parameter(torch.ones(p.shape, dtype=dtype), requires_grad=False))
        for bname, b in list(m.named_buffers(recurse=False)):
            if b.is_meta:
                m.register_buffer(bname, torch.zeros(b.shape, dtype=b.dtype))
    del sd
    t.is_loaded_in_4bit = True  # as diffusers marks a bnb-quantized model: PEFT then wraps Linear4bit
    return t.eval().to(device), plain


def peft_state(path: str, lmap: dict) -> dict:
    """A kohya Flux LoRA (BFL module names) as diffusers/PEFT keys for load_lora_weights.

    diffusers' own kohya converter assumes FLUX.1's 3072 widths; this one
    follows the model's layer map (the split of fused qkv and linear1 into
    diffusers' Linears by rows), as arenahost maps them, and folds the
    alpha/rank scale into lora_B (so PEFT's scale is 1).
    """
    from safetensors.torch import load_file

    sd = load_file(path)
    out = {}
    for d, (b, rows) in lmap.items():
        k = "lora_unet_" + b.replace(".", "_")
        down, up = sd.get(k + ".lora_down.weight"), sd.get(k + ".lora_up.weight")
        if down is None or up is None:
            continue
        r = down.shape[0]
        alpha = float(sd[k + ".alpha"]) if k + ".alpha" in sd else float(r)
        up = up.float() * (alpha / r)
        if rows:
            up = __import__("torch").cat([up[r0: r0 + n] for r0, n in rows])
        out[f"transformer.{d}.lora_A.weight"] = down.float().contiguous()
        out[f"transformer.{d}.lora_B.weight"] = up.contiguous()
    if not out:
        raise ValueError(f"{path}: no kohya Flux module matches the transformer")
    return out


def baseline(a) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from arenahost.diffusers_flux import flux_layer_map, prompt_embeddings

    dtype = getattr(torch, a.dtype)
    dev = a.device
    cuda = dev.startswith("cuda")
    cap_note = "no device allocator to cap (CPU)"
    if cuda:
        idx = torch.device(dev).index or 0
        total = torch.cuda.get_device_properties(idx).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_bytes / total), idx)
        cap_note = f"per-process memory fraction {a.cap_bytes / total:.4f} of {total} bytes"
    print(json.dumps({"note": f"baseline cap {a.cap_bytes} bytes: {cap_note}"}), flush=True)
    configs = json.loads(a.configs)
    vae = AutoencoderKL.from_pretrained(str(Path(a.model_dir) / "vae"), torch_dtype=dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(Path(a.model_dir) / "scheduler"))
    cfg = json.loads((Path(a.model_dir) / "transformer" / "config.json").read_text())
    pe, pooled = prompt_embeddings("capgen", tokens=a.stand_in_tokens, context_dim=cfg["joint_attention_dim"],
                                   pooled_dim=cfg["pooled_projection_dim"], dtype=dtype)
    pipe = None

    def is_oom(e: BaseException) -> bool:
        return isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()

    for c in configs:
        row = {"loras": len(c["loras"]), "rank": c["rank"], "mode": c["mode"]}
        if a.deadline and time.time() > a.deadline:
            print(json.dumps({**row, "skipped": "time budget"}), flush=True)
            continue
        try:
            if pipe is None:
                t0 = time.perf_counter()
                t, plain = bnb_transformer(a.model_dir, a.checkpoint, dtype, dev)
                pipe = FluxPipeline(scheduler=sched, vae=vae.to(dev), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, transformer=t)
                row["build_s"] = round(time.perf_counter() - t0, 3)
                row["plain_linears"] = plain
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            names = []
            lmap = flux_layer_map(pipe.transformer, "flux-bfl")
            for i, path in enumerate(c["loras"]):
                pipe.load_lora_weights(peft_state(path, lmap), adapter_name=f"l{i}")
                names.append(f"l{i}")
            if names:
                pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
                if c["mode"] == "fuse":
                    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
                    pipe.unload_lora_weights()
            if cuda:
                torch.cuda.synchronize()
            row["apply_s"] = round(time.perf_counter() - t0, 3)
            marks = []

            def cb(_p, i, _t, kw):
                if cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
                return kw

            with torch.inference_mode():
                t0 = time.perf_counter()
                out = pipe(prompt_embeds=pe.to(dev), pooled_prompt_embeds=pooled.to(dev), height=a.size, width=a.size,
                           num_inference_steps=a.steps, guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                           output_type="pil", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
            steps = [b - p for p, b in zip([t0] + marks[:-1], marks)]
            row["step_ms"] = round(statistics.median(steps[1:] or steps) * 1000, 1)
            row["image"] = list(out.images[0].size)
            row["peak_bytes"] = int(torch.cuda.max_memory_reserved()) if cuda else 0
            row["oom"] = False
            if names and c["mode"] != "fuse":
                pipe.unload_lora_weights()
            if c["mode"] == "fuse" and names:
                pipe = None  # the fused codes changed: the next config starts from the checkpoint
        except Exception as e:  # noqa: BLE001 - every failure is a row; OOM is the finding
            row.update(oom=is_oom(e), error=f"{type(e).__name__}: {str(e)[:300]}")
            row["peak_bytes"] = int(torch.cuda.max_memory_reserved()) if cuda else 0
            pipe = None
            if cuda:
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--out", required=True)
    f.add_argument("--flux", required=True)
    f.add_argument("--vae", choices=("full", "small"), default="full")
    f.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("baseline")
    b.add_argument("--model-dir", required=True)
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--configs", required=True)
    b.add_argument("--cap-bytes", type=int, required=True)
    b.add_argument("--size", type=int, default=1024)
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    b.add_argument("--stand-in-tokens", type=int, default=512)
    b.add_argument("--device", default="cuda:0")
    b.add_argument("--deadline", type=float, default=0)
    a = ap.parse_args()
    fixture(a) if a.cmd == "fixture" else baseline(a)


if __name__ == "__main__":
    main()
