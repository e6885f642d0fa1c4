"""Times bitsandbytes' CPU quantize_4bit / dequantize_4bit (torch backend)
on the data shape the Go benchmarks in shared/nf4/bench_test.go use:
N random normal bf16 elements (default 64 Mi, or ARENAHOST_NF4_BENCH_ELEMS),
NF4, blocksize 64, as a [N/4096, 4096] weight.

Prints one JSON object per line:
  {"op": "quantize_4bit", "elems": N, "seconds": best, "melem_per_s": ...}
for quantize_4bit, quantize_4bit(compress_statistics=True) and
dequantize_4bit (bf16 out), each the best of --repeat runs after a warm-up.
With --go FILE (the output of `go test -bench` for shared/nf4), it also
prints one line per operation with the Go figure and the Go/bnb ratio:
  nf4 quantize_4bit: go 51.8 Melem/s, bnb 8.7 Melem/s, go/bnb 5.96x
(BenchmarkQuantize, BenchmarkQuantizeNested and BenchmarkDequantize map to
quantize_4bit, quantize_4bit_nested and dequantize_4bit).
"""
import argparse
import json
import os
import time

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

p = argparse.ArgumentParser()
p.add_argument("--elems", type=int, default=int(os.environ.get("ARENAHOST_NF4_BENCH_ELEMS", 64 << 20)))
p.add_argument("--repeat", type=int, default=3)
p.add_argument("--go", help="go test -bench output to compare against")
a = p.parse_args()
n = a.elems
cols = 4096 if n % 4096 == 0 else n
g = torch.Generator().manual_seed(42)
x = (torch.randn(n // cols, cols, generator=g) * 0.02).to(torch.bfloat16)


def best(fn):
    fn()  # warm-up (first call may compile or allocate)
    ts = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


results = {}


def report(op, secs):
    results[op] = n / secs / 1e6
    print(json.dumps({"op": op, "elems": n, "seconds": round(secs, 6), "melem_per_s": round(n / secs / 1e6, 3),
                      "torch": torch.__version__, "bitsandbytes": bnb.__version__, "threads": torch.get_num_threads()}),
          flush=True)


report("quantize_4bit", best(lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")))
report("quantize_4bit_nested",
       best(lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")))
packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
report("dequantize_4bit", best(lambda: F.dequantize_4bit(packed, state)))

if a.go:
    import re

    names = {"BenchmarkQuantize": "quantize_4bit", "BenchmarkQuantizeNested": "quantize_4bit_nested",
             "BenchmarkDequantize": "dequantize_4bit"}
    with open(a.go) as f:
        for line in f:
            m = re.match(r"^(Benchmark\w+?)(-\d+)?\s.*?([\d.]+) Melem/s", line)
            if m and m.group(1) in names and names[m.group(1)] in results:
                op = names[m.group(1)]
                go = float(m.group(3))
                print("nf4 %s: go %.1f Melem/s, bnb %.1f Melem/s, go/bnb %.2fx" % (op, go, results[op], go / results[op]))
