"""Oracle for shared/half: torch's CPU conversions between float32 and the
16-bit formats. Writes little-endian binary files into OUTDIR:

  bf16_all.f32   torch.bfloat16 -> float32 for all 65536 bit patterns
  f16_all.f32    torch.float16  -> float32 for all 65536 bit patterns
  f32_in.f32     float32 inputs: random bit patterns, random values in the
                 f16 range (normals and denormals), exact bf16/f16 ties,
                 boundaries and specials
  f32_in.bf16    torch .to(torch.bfloat16) of f32_in
  f32_in.f16     torch .to(torch.float16)  of f32_in
"""
import sys, os
import numpy as np
import torch

out = sys.argv[1]
rng = np.random.default_rng(20261126)

pat = torch.arange(65536, dtype=torch.int32).to(torch.int16)
pat.view(torch.bfloat16).float().numpy().astype("<f4").tofile(os.path.join(out, "bf16_all.f32"))
pat.view(torch.float16).float().numpy().astype("<f4").tofile(os.path.join(out, "f16_all.f32"))

parts = []
# Random bit patterns over the whole float32 range (includes NaN/Inf/denormals).
parts.append(rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32))
# Random values whose exponent lies around the f16 range (denormals, normals, overflow).
e = rng.integers(95, 150, size=400_000, dtype=np.uint64).astype(np.uint32)
m = rng.integers(0, 2**23, size=400_000, dtype=np.uint64).astype(np.uint32)
s = rng.integers(0, 2, size=400_000, dtype=np.uint64).astype(np.uint32)
parts.append((s << 31) | (e << 23) | m)
# Exact bf16 ties (low 16 bits 0x8000) and near-ties.
hi = rng.integers(0, 2**16, size=100_000, dtype=np.uint64).astype(np.uint32) << 16
parts.append(hi | 0x8000)
parts.append(hi | 0x7FFF)
parts.append(hi | 0x8001)
# Exact f16 ties in the normal range (low 13 bits 0x1000) and in the denormal range.
e = rng.integers(100, 143, size=100_000, dtype=np.uint64).astype(np.uint32)
m = rng.integers(0, 2**10, size=100_000, dtype=np.uint64).astype(np.uint32) << 13
parts.append((s[:100_000] << 31) | (e << 23) | m | 0x1000)
# f16 denormal ties: k/2 * 2^-24 for k odd, small k.
k = np.arange(1, 2048, 2, dtype=np.float64) * 2.0**-25
parts.append(np.concatenate([k, -k]).astype(np.float32).view(np.uint32))
special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 65536.0,
                    2.0**-14, 2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26, 6.1e-5,
                    3.3895313892515355e38, 3.4028234663852886e38, 1.0, -1.0, 1e-45, 1.17549435e-38],
                   dtype=np.float32).view(np.uint32)
parts.append(special)
parts.append(special | 0x80000000)
x = np.concatenate(parts).astype("<u4").view("<f4")
x.tofile(os.path.join(out, "f32_in.f32"))
t = torch.from_numpy(x.copy())
t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tofile(os.path.join(out, "f32_in.bf16"))
t.to(torch.float16).view(torch.int16).numpy().astype("<i2").tofile(os.path.join(out, "f32_in.f16"))
print(len(x))
