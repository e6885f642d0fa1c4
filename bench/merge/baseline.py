"""NumPy/OpenBLAS baseline of `arenahost merge --as nf4` (bench/merge).

Today's algorithm, written the way a NumPy user would: per NF4 weight,
dequantize the whole layer to float32, add sum(s * B @ A) with OpenBLAS
(np.matmul), re-quantize with the bitsandbytes rule (absmax per block, code
= number of NF4 midpoints strictly below x / absmax), write the file.

    baseline.py merge --model M --lora L [--lora L2 ...] --out O
    baseline.py sgemm

Both print one JSON line. `sgemm` measures the fp32 GEMM throughput of the
OpenBLAS that NumPy loaded, on a square product and on the delta's own
shapes, and names the kernel OpenBLAS picked (its corename). The caller
runs this with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset.
"""
import argparse
import ctypes
import glob
import json
import os
import struct
import sys
import time

import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
THRESHOLDS = ((NF4[:-1] + NF4[1:]) / np.float32(2)).astype(np.float32)


def openblas_info():
    """The OpenBLAS build and the core kernel it chose at run time."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    out = {"numpy": np.__version__}
    for lib in libs:
        try:
            so = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename",
                                           "scipy_openblas_get_config64_", "openblas_get_config"):
            try:
                fn = getattr(so, name)
            except AttributeError:
                continue
            fn.restype = ctypes.c_char_p
            out["corename" if "corename" in name else "config"] = fn().decode()
    return out


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header, 8 + n


def bf16_to_f32(raw):
    return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def tensor(mm, start, info):
    b, e = info["data_offsets"]
    raw = mm[start + b:start + e]
    if info["dtype"] == "BF16":
        return bf16_to_f32(raw.tobytes()).reshape(info["shape"])
    if info["dtype"] == "F32":
        return np.frombuffer(raw.tobytes(), dtype=np.float32).reshape(info["shape"])
    if info["dtype"] == "F16":
        return np.frombuffer(raw.tobytes(), dtype=np.float16).astype(np.float32).reshape(info["shape"])
    raise ValueError(f"dtype {info['dtype']}")


def load_lora(path):
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    mods = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        mod, _, kind = k.partition(".")
        mods.setdefault(mod, {})[kind] = tensor(mm, start, info)
    out = {}
    for mod, t in mods.items():
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(t["alpha"]) if "alpha" in t else rank
        out[mod] = (up.astype(np.float32) * np.float32(alpha / rank), down.astype(np.float32))
    return out


def merge(args):
    t0 = time.perf_counter()
    header, start = read_header(args.model)
    mm = np.memmap(args.model, dtype=np.uint8, mode="r")
    loras = [load_lora(p) for p in args.lora]
    with open(args.out, "wb") as out:
        raw_header = mm[:start].tobytes()
        out.write(raw_header)
        new = {}
        for key, info in header.items():
            if not key.endswith(".weight") or key + ".quant_state.bitsandbytes__nf4" not in header:
                continue
            qs = json.loads(mm[start + header[key + ".quant_state.bitsandbytes__nf4"]["data_offsets"][0]:
                               start + header[key + ".quant_state.bitsandbytes__nf4"]["data_offsets"][1]].tobytes())
            rows, cols = qs["shape"]
            bs = qs["blocksize"]
            mod = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
            terms = [l[mod] for l in loras if mod in l]
            if not terms:
                continue
            b, e = info["data_offsets"]
            packed = np.frombuffer(mm[start + b:start + e].tobytes(), dtype=np.uint8)
            absmax = tensor(mm, start, header[key + ".absmax"]).reshape(-1)
            n = rows * cols
            codes = np.empty(2 * packed.size, dtype=np.uint8)
            codes[0::2] = packed >> 4
            codes[1::2] = packed & 15
            w = NF4[codes[:n]] * np.repeat(absmax, bs)[:n]  # dequantize in float32
            w = w.reshape(rows, cols)
            for up, down in terms:  # add sum(s * B @ A), OpenBLAS sgemm
                w += up @ down
            blocks = w.reshape(-1, bs)  # requantize (n is a multiple of bs here)
            am = np.abs(blocks).max(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                xn = blocks * (np.float32(1) / am)[:, None]
            q = np.searchsorted(THRESHOLDS, xn.reshape(-1), side="left").astype(np.uint8)
            new[key] = (q[0::2] << 4 | q[1::2]).astype(np.uint8).tobytes()
            new[key + ".absmax"] = am.astype(np.float32).tobytes()
        for key, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                key=lambda kv: kv[1]["data_offsets"][0]):
            b, e = info["data_offsets"]
            data = new.get(key)
            if data is None:
                data = mm[start + b:start + e].tobytes()
            assert len(data) == e - b, key
            out.write(data)
    import resource
    print(json.dumps({"seconds": time.perf_counter() - t0, "layers": len(new) // 2,
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, **openblas_info()}))


def best_rate(fn, flops, reps):
    """Best wall-clock GFLOP/s over reps, and GFLOP per CPU-second (all
    threads' CPU time: the rate a core gives while it runs this, whatever
    else shares the machine)."""
    fn()
    best, cpu = 0.0, 0.0
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
        cpu = max(cpu, flops / max(time.process_time() - c, 1e-9) / 1e9)
    return best, cpu


def sgemm(args):
    rng = np.random.default_rng(1)
    n = args.n
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    res = {"square_n": n}
    res["square_gflops"], res["square_gflops_cpu"] = best_rate(lambda: a @ b, 2 * n ** 3, args.reps)
    for r in (16, 80):
        up = rng.standard_normal((12288, r), dtype=np.float32)
        down = rng.standard_normal((r, 3072), dtype=np.float32)
        res[f"delta_shape_r{r}_gflops"], res[f"delta_shape_r{r}_gflops_cpu"] = best_rate(
            lambda: up @ down, 2 * 12288 * 3072 * r, args.reps)
    res.update(openblas_info())
    res["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")}
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--model", required=True)
    m.add_argument("--lora", action="append", required=True)
    m.add_argument("--out", required=True)
    s = sub.add_parser("sgemm")
    s.add_argument("--n", type=int, default=2048)
    s.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    {"merge": merge, "sgemm": sgemm}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
