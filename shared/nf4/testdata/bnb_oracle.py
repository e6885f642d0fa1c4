"""Oracle for shared/nf4: bitsandbytes (CPU backend) and torch write what the
Go tests compare against. Usage: bnb_oracle.py OUTDIR

Writes into OUTDIR:
  case_<name>.safetensors        a bnb.nn.Linear4bit state_dict saved with
                                 safetensors.torch.save_file (bnb's own
                                 serialization; keys under "blk.<name>.")
  case_<name>.expect.safetensors "input" (the dense weight, its dtype) and
                                 "dequant" (bnb.functional.dequantize_4bit of
                                 the module's weight, its dtype)
  quant.safetensors              random bf16 inputs "x.<n>" and bnb's
                                 quantize_4bit outputs for blocksize 64/128:
                                 "packed.<n>.<bs>", "absmax.<n>.<bs>",
                                 and with compress_statistics=True
                                 "qabsmax.<n>.<bs>", "nabsmax.<n>.<bs>",
                                 "offset.<n>.<bs>" ([1] F32), "nmap" ([256]);
                                 FP4 codes "packedfp4.<n>.<bs>"
  mean.safetensors               "in.<n>" float32 and torch's "out.<n>" =
                                 in.mean() ([1] F32), with torch's default
                                 thread count, "out1.<n>" with 1 thread and
                                 "out4.<n>" with 4 threads
  manifest.json                  the cases and sizes, plus the environment
"""
import json
import os
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

out = sys.argv[1]
g = torch.Generator().manual_seed(20261126)

# name, out_features, in_features, dtype, blocksize, nested, quant_type, quant_storage
CASES = [
    ("nf4_bf16_bs64_nested", 64, 128, torch.bfloat16, 64, True, "nf4", torch.uint8),
    ("nf4_bf16_bs64_plain_odd", 33, 17, torch.bfloat16, 64, False, "nf4", torch.uint8),
    ("nf4_f16_bs128_nested", 48, 80, torch.float16, 128, True, "nf4", torch.uint8),
    ("nf4_f16_bs128_plain_odd", 7, 33, torch.float16, 128, False, "nf4", torch.uint8),
    ("nf4_bf16_bs64_nested_big", 300, 260, torch.bfloat16, 64, True, "nf4", torch.uint8),
    ("nf4_f16_bs64_nested_odd", 101, 99, torch.float16, 64, True, "nf4", torch.uint8),
    ("nf4_bf16_bs128_plain", 96, 64, torch.bfloat16, 128, False, "nf4", torch.uint8),
    ("nf4_f32_bs64_nested", 16, 40, torch.float32, 64, True, "nf4", torch.uint8),
    ("nf4_bf16_bs64_storage_bf16", 32, 64, torch.bfloat16, 64, False, "nf4", torch.bfloat16),
    ("fp4_bf16_bs64_nested", 40, 72, torch.bfloat16, 64, True, "fp4", torch.uint8),
    ("fp4_f16_bs128_plain_odd", 9, 15, torch.float16, 128, False, "fp4", torch.uint8),
]

manifest = {
    "torch": torch.__version__,
    "bitsandbytes": bnb.__version__,
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "threads": torch.get_num_threads(),
    "cases": [],
}

for name, o, i, dtype, bs, nested, qt, storage in CASES:
    mod = bnb.nn.Linear4bit(i, o, bias=True, compute_dtype=dtype, compress_statistics=nested,
                            quant_type=qt, quant_storage=storage)
    w = (torch.randn(o, i, generator=g) * 0.05).to(dtype)
    w[0, : min(i, 5)] = 0  # a few exact zeros
    mod.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=bs, compress_statistics=nested,
                                   quant_type=qt, quant_storage=storage, module=mod)
    mod.bias = torch.nn.Parameter((torch.randn(o, generator=g) * 0.1).to(dtype), requires_grad=False)
    mod = mod.to("cpu")  # Params4bit.to quantizes here
    assert mod.weight.bnb_quantized
    sd = {("blk.%s.%s" % (name, k)): v.contiguous() for k, v in mod.state_dict().items()}
    save_file(sd, os.path.join(out, "case_%s.safetensors" % name))
    deq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    assert deq.dtype == dtype and tuple(deq.shape) == (o, i)
    save_file({"input": w.contiguous(), "dequant": deq.contiguous()},
              os.path.join(out, "case_%s.expect.safetensors" % name))
    manifest["cases"].append({"name": name, "weight": "blk.%s.weight" % name, "shape": [o, i],
                              "dtype": str(dtype).replace("torch.", ""), "blocksize": bs, "nested": nested,
                              "quant_type": qt})

SIZES = [1, 63, 64, 65, 1001, 4097, 65537, 1000003]
qt = {}
for n in SIZES:
    x = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    qt["x.%d" % n] = x
    for bs in (64, 128):
        p, st = F.quantize_4bit(x, blocksize=bs, compress_statistics=False, quant_type="nf4")
        qt["packed.%d.%d" % (n, bs)] = p.reshape(-1).contiguous()
        qt["absmax.%d.%d" % (n, bs)] = st.absmax.contiguous()
        pf, stf = F.quantize_4bit(x, blocksize=bs, compress_statistics=False, quant_type="fp4")
        qt["packedfp4.%d.%d" % (n, bs)] = pf.reshape(-1).contiguous()
        p2, st2 = F.quantize_4bit(x, blocksize=bs, compress_statistics=True, quant_type="nf4")
        assert torch.equal(p2, p)
        qt["qabsmax.%d.%d" % (n, bs)] = st2.absmax.contiguous()
        qt["nabsmax.%d.%d" % (n, bs)] = st2.state2.absmax.contiguous()
        qt["offset.%d.%d" % (n, bs)] = st2.offset.reshape(1).float().contiguous()
        qt["nmap"] = st2.state2.code.contiguous()
save_file(qt, os.path.join(out, "quant.safetensors"))
manifest["sizes"] = SIZES

MEAN_SIZES = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 127, 129, 255, 256, 257, 1000, 1023, 1025,
              4095, 4097, 10000, 16383, 16385, 32767, 32768, 65536, 100001, 262144]
mm = {}
for n in MEAN_SIZES:
    a = torch.rand(n, generator=g, dtype=torch.float32) * 0.1
    mm["in.%d" % n] = a
    mm["out.%d" % n] = a.mean().reshape(1)
threads = torch.get_num_threads()
torch.set_num_threads(1)
for n in MEAN_SIZES:
    mm["out1.%d" % n] = mm["in.%d" % n].mean().reshape(1)
torch.set_num_threads(4)
for n in MEAN_SIZES:
    mm["out4.%d" % n] = mm["in.%d" % n].mean().reshape(1)
torch.set_num_threads(threads)
save_file(mm, os.path.join(out, "mean.safetensors"))
manifest["mean_sizes"] = MEAN_SIZES

with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
