"""Python side of arenahost-gpucheck (run by it; needs torch with CUDA, and cupy
for the SDK's preferred route; without cupy the SDK opens handles with the CUDA
runtime torch loaded).

    torch_check.py ipc   REQUEST_JSON   open the host's slab, check its floats, write ours
    torch_check.py merge REQUEST_JSON   the plain-PyTorch merge baseline; prints one JSON line

The ipc mode goes through the SDK's arenahost.cuda (cupy ipcOpenMemHandle +
DLPack, no copy), imported without arenahost/__init__ so a GPU machine needs
neither grpc nor protobuf for it.
"""

import json
import os
import sys
import time
import types

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def sdk_cuda():
    root = os.environ.get("ARENAHOST_ROOT") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    pkg = types.ModuleType("arenahost")
    pkg.__path__ = [os.path.join(root, "sdk", "python", "arenahost")]
    sys.modules.setdefault("arenahost", pkg)
    import arenahost.cuda as c

    return c


def ipc(req):
    import torch

    c = sdk_cuda()
    slab = c.SlabInfo(id=req["slab"], handle=bytes.fromhex(req["handle"]), size=req["size"], device=req["device"], host_pid=req["host_pid"])
    n = req["count"]
    m = c.CudaMapper()
    t = m.tensor_at(c.layout_of(slab, req["offset"], 4 * n, "DTYPE_F32", [n], 4 * n))
    want = torch.arange(n, device=t.device, dtype=torch.float32) * 0.5
    bad = int((t != want).sum().item())
    w = m.tensor_at(c.layout_of(slab, req["write_off"], 4 * n, "DTYPE_F32", [n], 4 * n))
    # zero copy: both views lie in the one mapping of the slab
    if w.data_ptr() - t.data_ptr() != req["write_off"] - req["offset"]:
        print(f"views are not in one mapping: {w.data_ptr() - t.data_ptr()}")
        return 1
    w.copy_(torch.arange(n, device=w.device, dtype=torch.float32) * -2)
    torch.cuda.synchronize(t.device)
    del t, w
    m.close()
    if bad:
        print(f"read {bad}/{n} values wrong")
        return 1
    how = "cupy ipcOpenMemHandle + DLPack" if m._backend == "cupy" else "cudart cudaIpcOpenMemHandle + __cuda_array_interface__"
    print(f"read ok: {n} host values as a torch tensor via {how}, wrote {n}")
    return 0


def merge(req):
    import torch

    dev = torch.device(os.environ.get("ARENAHOST_TORCH_DEVICE", "cuda"))
    rank, k, bs = req["rank"], req["loras"], req["blocksize"]
    lut = torch.tensor(NF4, dtype=torch.float32, device=dev)
    thr = ((lut[:-1] + lut[1:]) / 2).contiguous()  # fp32 midpoints, ascending
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    layers = []
    for out, inn in req["layers"]:
        n = out * inn
        nb = -(-n // bs)
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=dev, generator=g)
        absmax = torch.rand(nb, device=dev, generator=g) * 0.045 + 0.005
        a = [torch.randn(rank, inn, device=dev, generator=g).to(torch.bfloat16) * 0.01 for _ in range(k)]
        b = [torch.randn(out, rank, device=dev, generator=g).to(torch.bfloat16) * 0.01 for _ in range(k)]
        layers.append((out, inn, n, nb, packed, absmax, a, b))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for out, inn, n, nb, packed, absmax, a, b in layers:
        codes = torch.stack((packed >> 4, packed & 15), dim=1).flatten()[:n].long()
        w = (lut[codes] * absmax.repeat_interleave(bs)[:n]).view(out, inn)
        for ai, bi in zip(a, b):
            w.addmm_(bi.float(), ai.float(), alpha=0.8)
        flat = w.flatten()
        if nb * bs != n:
            flat = torch.nn.functional.pad(flat, (0, nb * bs - n))
        blocks = flat.view(nb, bs)
        am = blocks.abs().amax(dim=1)
        xn = (blocks * (1.0 / am)[:, None]).flatten()[:n]
        q = torch.searchsorted(thr, xn)  # count of thresholds strictly below x
        if n % 2:
            q = torch.cat((q, torch.full((1,), 7, dtype=q.dtype, device=dev)))
        packed.copy_(((q[0::2] << 4) | q[1::2]).to(torch.uint8))
        absmax.copy_(am)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    print(json.dumps({"seconds": secs, "peak_extra_bytes": int(peak), "layers": len(layers), "torch": torch.__version__}))
    return 0


def main(argv):
    if len(argv) != 3 or argv[1] not in ("ipc", "merge"):
        print(__doc__, file=sys.stderr)
        return 2
    req = json.loads(argv[2])
    return ipc(req) if argv[1] == "ipc" else merge(req)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
