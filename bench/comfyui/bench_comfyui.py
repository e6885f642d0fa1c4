"""ComfyUI step time and memory: the arenahost pack's side mode vs ComfyUI's own LoRA loader.

One process, ComfyUI 0.30's own modules (vendored, --cpu). A real arenahost
holds an NF4 Flux model (`arenahost sample --hidden 512 --mlp 2048`: 2 double
+ 4 single blocks) and three kohya LoRAs (rank 16) on it. Compared, with the
same three LoRAs at strengths 0.8 / 0.5 / 0.3:

* pack, side mode: "Load NF4 model (arenahost)" + "LoRA (arenahost)"; NF4
  dequantized per forward (the default) and with cache_weights;
* ComfyUI: the same weights dequantized to a bf16 checkpoint, UNETLoader +
  three LoraLoaderModelOnly (patches merged into ComfyUI's fp32 CPU weights).

Step time: one model call (apply_model) on a 512×512 latent (1024 image
tokens, 16 text tokens), median of --rounds. Memory: what building the model
and its first step add to this process, private (RssAnon) and shared
(RssShmem, the arena's pages). Run by `make bench` (BENCH_ONLY=comfyui);
glibc's mmap threshold is fixed (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_) so freed temporaries do not stay counted.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ.update(MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576")
    os.execv(sys.executable, [sys.executable] + sys.argv)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "sdk" / "comfyui" / "tests"))
import conftest as c  # noqa: E402  (the pack tests' Host and ComfyUI setup)

import torch  # noqa: E402

STRENGTHS = (0.8, 0.5, 0.3)


def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssShmem"):
            out[k] = int(v.split()[0]) * 1024
    return out


def mib(b):
    return f"{b / 2**20:8.1f} MiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    import folder_paths
    import nodes
    import comfy.model_management as mm
    from safetensors.torch import save_file

    from arenahost.diffusers_check import write_kohya_lora
    from arenahost.torch import as_tensor, dequantize_4bit
    from arenahost_comfyui.client import HostHTTP
    from arenahost_comfyui.nodes import LoadNF4ModelArenahost, LoRAArenahost

    tmp = Path(tempfile.mkdtemp(prefix="bench-comfyui-"))
    h = c.Host(tmp / "data")
    import subprocess
    subprocess.run([str(h.bin), "sample", "--out", str(tmp / "gen"), "--hidden", "512", "--mlp", "2048"], check=True, capture_output=True)
    (tmp / "data" / "models").mkdir(parents=True)
    (tmp / "data" / "loras").mkdir(parents=True)
    (tmp / "gen" / "flux-sample-nf4.safetensors").rename(tmp / "data" / "models" / "bench.safetensors")
    h.start()
    try:
        host = HostHTTP(h.url)
        m = host.load_model("bench.safetensors", "bench")
        descs = host.lookup_tensors("bench").tensors
        sd = {}
        for d in descs:
            sd[d.name] = dequantize_4bit(d, host.mapper).contiguous() if d.HasField("quant") else as_tensor(d, host.mapper, writable=False).clone()
        dm = tmp / "diffusion_models"
        dm.mkdir()
        save_file(sd, str(dm / "bench-bf16.safetensors"))
        loras = []
        for i in range(3):
            name = f"bench-lora-{i}"
            write_kohya_lora(str(tmp / "data" / "loras" / f"{name}.safetensors"), sd, rank=16, alpha=16.0, seed=10 + i)
            loras.append((name, STRENGTHS[i]))
        del sd
        gc.collect()
        folder_paths.add_model_folder_path("diffusion_models", str(dm), is_default=True)
        folder_paths.add_model_folder_path("loras", str(tmp / "data" / "loras"), is_default=True)

        lat = args.size // 8
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, lat, lat, generator=g)
        ctx = torch.randn(1, 16, 4096, generator=g) * 0.5
        y = torch.randn(1, 768, generator=g) * 0.5
        t = torch.tensor([0.7])

        def step(p):
            return p.model.apply_model(x, t, c_crossattn=ctx, y=y, guidance=torch.tensor([3.5]))

        def timed(label, build):
            gc.collect()
            m0 = mem()
            p = build()
            out = step(p)
            m1 = mem()
            ts = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                step(p)
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts)
            print(f"{label:<52} step {med * 1000:8.1f} ms   private +{mib(m1['RssAnon'] - m0['RssAnon'])}   "
                  f"shared +{mib(m1['RssShmem'] - m0['RssShmem'])}", flush=True)
            return p, out, med

        def pack(cache):
            def build():
                base = LoadNF4ModelArenahost().load("bench", host_url=h.url, cache_weights=cache)["result"][0]
                kw = {}
                for i, (n, s) in enumerate(loras, 1):
                    kw[f"lora_{i}"], kw[f"strength_{i}"] = n, s
                return LoRAArenahost().apply(base, "side", **kw)["result"][0]
            return build

        def comfy():
            p = nodes.UNETLoader().load_unet("bench-bf16.safetensors", "default")[0]
            for n, s in loras:
                p = nodes.LoraLoaderModelOnly().load_lora_model_only(p, n + ".safetensors", s)[0]
            mm.load_models_gpu([p], force_full_load=True)
            return p

        print(f"model: {m['params']} parameters, {mib(m['bytes'])} in the arena (NF4); 3 kohya LoRAs rank 16; "
              f"latent {lat}x{lat}; torch threads {torch.get_num_threads()}")
        _, a, t_pack = timed("pack side mode (NF4 dequantized per forward)", pack(False))
        _, a2, t_cache = timed("pack side mode, cache_weights (fp32 kept)", pack(True))
        _, b, t_comfy = timed("ComfyUI UNETLoader bf16 + 3x LoraLoaderModelOnly", comfy)
        print("(shared: arena pages not yet touched by this process; exporting the bf16 checkpoint above already read most of them)")
        rel = ((a - b).abs().max() / b.abs().max()).item()
        print(f"ratio step time pack/ComfyUI: {t_pack / t_comfy:.2f}x (per-forward dequant), {t_cache / t_comfy:.2f}x (cached); "
              f"outputs agree to max|Δ|/max|y| = {rel:.2e}")
    finally:
        h.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
