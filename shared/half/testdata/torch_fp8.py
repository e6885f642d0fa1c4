"""Oracle for shared/half's 8-bit floats: torch's CPU conversions between
float32 and float8_e4m3fn / float8_e5m2. Writes little-endian files into
OUTDIR:

  e4m3_all.f32, e5m2_all.f32   every 8-bit pattern widened to float32
  f8_in.f32                    float32 inputs: random bit patterns, random
                               values around each format's range (denormals,
                               normals, overflow), exact ties, boundaries,
                               specials
  f8_in.e4m3, f8_in.e5m2       torch .to(float8_*) of f8_in (one byte each)
"""
import sys, os
import numpy as np
import torch

out = sys.argv[1]
rng = np.random.default_rng(20261207)

pat = torch.arange(256, dtype=torch.int32).to(torch.uint8)
pat.view(torch.float8_e4m3fn).float().numpy().astype("<f4").tofile(os.path.join(out, "e4m3_all.f32"))
pat.view(torch.float8_e5m2).float().numpy().astype("<f4").tofile(os.path.join(out, "e5m2_all.f32"))

n = 200_000
parts = [rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)]
for lo, hi, mbits in ((105, 137, 3), (97, 146, 2)):  # e4m3: 2^-22..2^9; e5m2: 2^-30..2^18
    e = rng.integers(lo, hi, size=n, dtype=np.uint64).astype(np.uint32)
    m = rng.integers(0, 2**23, size=n, dtype=np.uint64).astype(np.uint32)
    s = rng.integers(0, 2, size=n, dtype=np.uint64).astype(np.uint32)
    parts.append((s << 31) | (e << 23) | m)
    # exact ties (the dropped mantissa bits exactly half) and near-ties
    drop = 23 - mbits
    kept = rng.integers(0, 2**mbits, size=n // 4, dtype=np.uint64).astype(np.uint32) << drop
    base = (s[: n // 4] << 31) | (e[: n // 4] << 23) | kept
    parts += [base | (1 << (drop - 1)), base | ((1 << (drop - 1)) - 1), base | ((1 << (drop - 1)) + 1)]
# denormal ties: odd multiples of half the smallest denormal
for tiny in (2.0**-9, 2.0**-16):
    k = np.arange(1, 64, 2, dtype=np.float64) * tiny / 2
    parts.append(np.concatenate([k, -k]).astype(np.float32).view(np.uint32))
special = np.array([0.0, np.inf, np.nan, 1.0, 448.0, 449.0, 464.0, 464.01, 470.0, 479.99, 480.0, 512.0, 1e6,
                    57344.0, 61439.0, 61440.0, 65535.0, 65536.0, 1e30, 3.4028234663852886e38,
                    2.0**-6, 2.0**-9, 2.0**-10, 3 * 2.0**-11, 2.0**-14, 2.0**-16, 2.0**-17, 3 * 2.0**-18,
                    1e-45, 1.17549435e-38], dtype=np.float32).view(np.uint32)
parts += [special, special | 0x80000000]
x = np.concatenate(parts).astype("<u4").view("<f4")
x.tofile(os.path.join(out, "f8_in.f32"))
t = torch.from_numpy(x.copy())
t.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tofile(os.path.join(out, "f8_in.e4m3"))
t.to(torch.float8_e5m2).view(torch.uint8).numpy().tofile(os.path.join(out, "f8_in.e5m2"))
print(len(x))
