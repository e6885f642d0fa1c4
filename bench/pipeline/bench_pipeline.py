"""Pipeline step time on the CPU: LoRAs on a 4-bit Flux transformer, three ways, in one run.

usage: .venv-torch/bin/python bench/pipeline/bench_pipeline.py [--steps 4] [--size 256] [--rounds 3] [--threads 0] [--arenahost BIN]

The model is the NF4 sample written by ``arenahost sample`` (Flux BFL layout,
hidden 256, 2 double + 4 single blocks, FLUX.1 widths otherwise); the LoRAs
are a PEFT-keyed one (rank 4, 43 diffusers modules) and a kohya one (rank 4,
28 BFL modules), strengths 1.0 and 0.7. Each configuration runs a real
diffusers ``FluxPipeline`` (same scheduler, VAE unused: output_type="latent")
for ``--steps`` denoising steps at ``--size``² after one warm-up run, in
``--rounds`` interleaved rounds (so every configuration sees the same load
drift), and reports each configuration's best round (the median step
time of a round; on a shared machine load only adds time) and the median (a step = one transformer forward + the Euler
update), timed through ``callback_on_step_end``:

1. ``peft-bnb``: every Linear a ``bitsandbytes.nn.Linear4bit`` (nf4, the
   sample's codes, bf16 dequant, fp32 compute), both LoRAs loaded with
   ``load_lora_weights`` and left unmerged (PEFT's bnb LoRA layers): what
   UIs run on quantized Flux models.
2. ``arenahost-side``: the transformer patched with ``patch_pipeline`` onto
   the same NF4 checkpoint in a memfd arena behind a Host service over gRPC
   (the SDK tests' fake host; one LookupTensors per step), the same two LoRAs
   bound as side factors. Reported with the dequantized weights cached
   (``cache``) and dequantized on every forward like bnb (``nocache``).
3. ``no-lora``: both of the above without LoRAs.

Ratios printed: each LoRA configuration over its own no-LoRA baseline, and
arenahost side over PEFT-on-bnb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "sdk" / "python"))
sys.path.insert(0, str(ROOT / "sdk" / "python" / "tests"))  # the fake Host service and memfd arena


def bnb_transformer(sd, diff, cfg):
    """A FluxTransformer2DModel whose Linears are bnb Linear4bit with the checkpoint's codes (row slices for split layers)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import flux_layer_map

    t = dc.plain_transformer(diff, cfg)
    lmap = flux_layer_map(t, "flux-bfl")
    for name, mod in list(t.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        src, rows = lmap[name]
        st = dc.bnb_quant_state(sd, src + ".weight")
        in_f = st.shape[1]
        packed = sd[src + ".weight"].reshape(-1)
        parts_p, parts_a = [], []
        for r0, n in rows or [(0, st.shape[0])]:
            e0, e1 = r0 * in_f, (r0 + n) * in_f
            assert e0 % st.blocksize == 0 and e1 % st.blocksize == 0
            parts_p.append(packed[e0 // 2 : e1 // 2])
            parts_a.append(st.absmax[e0 // st.blocksize : e1 // st.blocksize])
        qs = F.QuantState(absmax=torch.cat(parts_a), shape=torch.Size([mod.out_features, in_f]), code=st.code,
                          blocksize=st.blocksize, quant_type=st.quant_type, dtype=st.dtype)
        lin = bnb.nn.Linear4bit(in_f, mod.out_features, bias=True, compute_dtype=torch.float32, quant_type=st.quant_type)
        lin.weight = bnb.nn.Params4bit(torch.cat(parts_p).reshape(-1, 1), requires_grad=False, quant_state=qs,
                                       quant_type=st.quant_type, blocksize=st.blocksize, compress_statistics=False,
                                       bnb_quantized=True, module=lin)
        lin.bias = torch.nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        pm = t.get_submodule(parent) if parent else t
        if attr.isdigit():
            pm[int(attr)] = lin
        else:
            setattr(pm, attr, lin)
    t.is_loaded_in_4bit = True  # as diffusers marks a bnb-quantized model: PEFT then wraps Linear4bit
    return t


def time_steps(pipe, steps, size, seed=0):
    import torch

    from arenahost.diffusers_flux import prompt_embeddings

    pe, pooled = prompt_embeddings("a lighthouse at dusk")
    marks = []

    def cb(_p, i, _t, kw):
        marks.append(time.perf_counter())
        return kw

    with torch.inference_mode():
        t0 = time.perf_counter()
        pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=size, width=size, num_inference_steps=steps,
             guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="latent",
             callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    d = [b - a for a, b in zip([t0] + marks[:-1], marks)][1:]  # drop step 1 (prepare_latents etc.)
    return statistics.median(d) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each round's median step time, best round reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--arenahost", default=str(Path(os.environ.get("ARENAHOST_BIN") or ROOT / "bin") / "arenahost"))
    a = ap.parse_args()

    import torch
    from diffusers import FluxPipeline

    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import SAMPLE_TRANSFORMER_CONFIG as cfg, build_small_pipeline, patch_pipeline
    from arenahost.host import HostClient
    from arenahost.plugin.v1 import plugin_pb2 as pb
    from conftest import Arena, serve_fake_host

    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    subprocess.run([a.arenahost, "sample", "--out", str(tmp)], check=True, capture_output=True)
    sd = dc.read_nf4_checkpoint(str(tmp / "flux-sample-nf4.safetensors"))
    bfl = dc.dequantized_bfl_state(sd)
    diff = dc.bfl_to_diffusers_state(bfl)
    peft = dc.write_peft_lora(str(tmp / "style_peft.safetensors"), diff, cfg)
    kohya = dc.write_kohya_lora(str(tmp / "detail_kohya.safetensors"), bfl)
    strengths = (1.0, 0.7)
    pipe = build_small_pipeline()
    tokens = (a.size // 16) ** 2
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Flux sample (hidden 256, 2+4 blocks), {a.size}x{a.size} = {tokens} image + 32 text tokens, "
          f"{a.steps} steps, median step time after step 1", flush=True)

    pipes = {}

    def add(name, transformer, factors=None):
        pipes[name] = (FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, transformer=transformer), factors)

    # 1. PEFT on bnb Linear4bit, unmerged, and its no-LoRA baseline (a second copy without adapters).
    add("no-lora bnb", bnb_transformer(sd, diff, cfg))
    tb = bnb_transformer(sd, diff, cfg)
    add("peft-bnb (unmerged)", tb)
    pipes["peft-bnb (unmerged)"][0].load_lora_weights(peft, adapter_name="peft")
    pipes["peft-bnb (unmerged)"][0].load_lora_weights(kohya, adapter_name="kohya")
    pipes["peft-bnb (unmerged)"][0].set_adapters(["peft", "kohya"], adapter_weights=list(strengths))
    wrapped = sum(1 for m in tb.modules() if type(m).__module__ == "peft.tuners.lora.bnb")

    # 2. arenahost side mode, same checkpoint and LoRAs, through a Host service.
    arena = Arena(96 << 20)
    res: dict[str, list[float]] = {}
    with serve_fake_host(arena) as (host, env):
        host.tensors = dc.arena_descriptors(arena, sd)
        client = HostClient(env["ARENAHOST_HOST_ADDR"], env["ARENAHOST_HOST_TOKEN"])
        shapes = {k: tuple(v.shape) for k, v in bfl.items() if k.endswith(".weight") and v.dim() == 2}
        facs = dc.side_factors_from_files([(peft, "peft", strengths[0]), (kohya, "kohya", strengths[1])], cfg, shapes)
        bound = {w: pb.LayerFactors(layer=w, a=arena.put(f"f/{w}/A", A.numpy()), b=arena.put(f"f/{w}/B", B.numpy()), binding_generation=1)
                 for w, (A, B) in facs.items()}
        for cache in (True, False):
            tag = "cache" if cache else "nocache"
            ta = __import__("diffusers").FluxTransformer2DModel(**cfg).float().eval()
            patch_pipeline(ta, client, model="sample", cache_weight=cache)
            add(f"no-lora arenahost ({tag})", ta, {})
            add(f"arenahost-side ({tag})", ta, bound)
        # Interleaved rounds: the machine's load drifts; every configuration sees the same drift.
        for name, (p, f) in pipes.items():
            if f is not None:
                host.factors = f
            time_steps(p, 2, a.size)  # warm-up
        for r in range(a.rounds):
            for name, (p, f) in pipes.items():
                if f is not None:
                    host.factors = f
                res.setdefault(name, []).append(time_steps(p, a.steps, a.size, seed=r))
        best = {k: min(v) for k, v in res.items()}
        for k, v in best.items():
            print(f"  {k:28s} {v:9.1f} ms/step best round, {statistics.median(res[k]):9.1f} median  "
                  f"(rounds: {', '.join(f'{x:.0f}' for x in res[k])})")
    arena.close()
    res = best

    print(f"PEFT wrapped {wrapped} bnb layers; arenahost bound {len(facs)} BFL layers")
    print("overhead ratios (best rounds; a shared machine's load only ever adds time):")
    print(f"  peft-bnb / no-lora bnb                      {res['peft-bnb (unmerged)'] / res['no-lora bnb']:.3f}")
    for tag in ("cache", "nocache"):
        print(f"  arenahost-side / no-lora arenahost ({tag:7s}) {res[f'arenahost-side ({tag})'] / res[f'no-lora arenahost ({tag})']:.3f}")
    for tag in ("cache", "nocache"):
        print(f"  arenahost-side ({tag:7s}) / peft-bnb          {res[f'arenahost-side ({tag})'] / res['peft-bnb (unmerged)']:.3f}")


if __name__ == "__main__":
    main()
