"""bitsandbytes 4-bit (NF4/FP4) dequantization in NumPy, bit-exact with bnb.

The rule (bitsandbytes ``dequantize_4bit``, CUDA kernel and default backend):

* packed byte ``j`` holds elements ``2j`` (high nibble) and ``2j+1`` (low);
* ``out[k] = T(fp32(code[q_k] * absmax[k // blocksize]))`` with an fp32
  multiply and a round-to-nearest-even conversion to the logical dtype ``T``;
* nested ("double quant") absmax is first restored as
  ``fp32(fp32(nested_code[qabsmax[b]] * nested_absmax[b // nested_blocksize]) + offset)``.

``code`` is the weight's stored ``quant_map`` (the NF4 table for nf4), never a
recomputed one. The Go codec in ``shared/nf4`` implements the same rule.
"""

from __future__ import annotations

import numpy as np

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper, default_mapper, dtype_name, f32_to_bf16

__all__ = [
    "NF4_CODE",
    "dequantize_nf4",
    "dequantize_4bit_arrays",
    "restore_nested_absmax",
    "quantize_nf4",
]

# The 16 NF4 code values (bitsandbytes get_4bit_type("nf4")), as fp32.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

_LOGICAL = {pb.DTYPE_F32: "float32", pb.DTYPE_F16: "float16", pb.DTYPE_BF16: "bfloat16"}


def restore_nested_absmax(
    qabsmax: np.ndarray, nested_code: np.ndarray, nested_absmax: np.ndarray, nested_blocksize: int, offset: float
) -> np.ndarray:
    """fp32 absmax from nested uint8 codes: fp32(fp32(code[q] * nabs[b // nbs]) + offset)."""
    q = np.asarray(qabsmax, dtype=np.uint8).reshape(-1)
    code = np.asarray(nested_code, dtype=np.float32).reshape(-1)
    nabs = np.asarray(nested_absmax, dtype=np.float32).reshape(-1)
    if nested_blocksize <= 0:
        raise ValueError(f"nested_blocksize {nested_blocksize} must be positive")
    need = -(-q.size // nested_blocksize)
    if nabs.size < need:
        raise ValueError(f"nested_absmax has {nabs.size} values, {q.size} codes at blocksize {nested_blocksize} need {need}")
    if code.size != 256:
        raise ValueError(f"nested_quant_map has {code.size} values, want 256")
    scale = np.repeat(nabs[:need], nested_blocksize)[: q.size]
    prod = code[q] * scale  # fp32 * fp32 -> fp32, rounded once
    return (prod + np.float32(offset)).astype(np.float32, copy=False)


_CHUNK = 1 << 20  # elements per pass: bounds the fp32 temporaries whatever the layer size


def dequantize_4bit_arrays(
    packed: np.ndarray,
    absmax: np.ndarray,
    code: np.ndarray,
    blocksize: int,
    shape,
    dtype: str = "float32",
    *,
    widen: bool = False,
) -> np.ndarray:
    """Dequantize packed 4-bit codes with an fp32 absmax.

    Returns the logical tensor in `dtype`: float32 and float16 as NumPy types,
    "bfloat16" as uint16 bf16 bits (NumPy has no bfloat16). widen=True
    returns the same values (rounded to `dtype`) widened exactly to float32.
    Works in chunks, so temporaries stay small for any layer size.
    """
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    raw = np.asarray(packed)
    raw = raw.reshape(-1).view(np.uint8) if raw.dtype != np.uint8 else raw.reshape(-1)
    if raw.size < (n + 1) // 2:
        raise ValueError(f"packed weight has {raw.size} bytes, shape {list(shape)} needs {(n + 1) // 2}")
    if blocksize <= 0:
        raise ValueError(f"blocksize {blocksize} must be positive")
    am = np.asarray(absmax, dtype=np.float32).reshape(-1)
    nblocks = -(-n // blocksize)
    if am.size < nblocks:
        raise ValueError(f"absmax has {am.size} values, {n} elements at blocksize {blocksize} need {nblocks}")
    cd = np.asarray(code, dtype=np.float32).reshape(-1)
    if cd.size != 16:
        raise ValueError(f"quant_map has {cd.size} values, want 16")
    if dtype in ("float32", np.float32):
        kind = "float32"
    elif dtype in ("float16", np.float16):
        kind = "float16"
    elif dtype == "bfloat16":
        kind = "bfloat16"
    else:
        raise ValueError(f"logical dtype {dtype!r} not supported (float32, float16, bfloat16)")
    out_dtype = np.float32 if (widen or kind == "float32") else (np.float16 if kind == "float16" else np.uint16)
    out = np.empty(n, dtype=out_dtype)
    step = max(1, _CHUNK // (2 * blocksize)) * 2 * blocksize  # even and block-aligned
    for s0 in range(0, n, step):
        e0 = min(n, s0 + step)
        m = e0 - s0
        b = raw[s0 // 2 : (e0 + 1) // 2]
        q = np.empty(2 * b.size, dtype=np.uint8)
        q[0::2] = b >> 4  # element 2j is the high nibble
        q[1::2] = b & 0x0F
        v = cd[q[:m]]
        full = (m // blocksize) * blocksize
        b0 = s0 // blocksize
        if full:
            vb = v[:full].reshape(-1, blocksize)
            np.multiply(vb, am[b0 : b0 + full // blocksize, None], out=vb)  # fp32 * fp32, rounded once
        if full < m:
            np.multiply(v[full:], am[b0 + full // blocksize], out=v[full:])
        if kind == "float32":
            out[s0:e0] = v
        elif kind == "float16":
            out[s0:e0] = v.astype(np.float16) if not widen else v.astype(np.float16).astype(np.float32)
        else:
            bits = f32_to_bf16(v)  # round to nearest even
            out[s0:e0] = bits if not widen else (bits.astype(np.uint32) << 16).view(np.float32)
    return out.reshape(shape)


def dequantize_nf4(desc: pb.TensorDescriptor, mapper: Mapper | None = None, dtype=None) -> np.ndarray:
    """Dequantize a bitsandbytes 4-bit weight descriptor, reading the arena zero-copy.

    dtype=None returns the logical dtype of desc.quant (bfloat16 as uint16
    bits). dtype=np.float32 returns the logical-dtype values widened to fp32
    (exactly what a bf16/fp16 compute would see, ready for NumPy matmuls).
    """
    m = mapper if mapper is not None else default_mapper()
    name = desc.name
    if not desc.HasField("quant"):
        raise DescriptorError(f"tensor {name!r}: not quantized (no quant info)")
    qi = desc.quant
    if qi.quant_type not in ("nf4", "fp4"):
        raise DescriptorError(f"tensor {name!r}: quant.quant_type {qi.quant_type!r} is not nf4 or fp4")
    logical = _LOGICAL.get(qi.dtype)
    if logical is None:
        raise DescriptorError(f"tensor {name!r}: quant.dtype {dtype_name(qi.dtype)} is not F32, F16 or BF16")
    shape = list(qi.shape)
    if not shape:
        raise DescriptorError(f"tensor {name!r}: quant.shape is empty")
    n = int(np.prod(shape, dtype=np.int64))
    packed = m.bytes(name, desc.region, (n + 1) // 2) if desc.region.length >= (n + 1) // 2 else None
    if packed is None:
        raise DescriptorError(
            f"tensor {name!r}: region length {desc.region.length} < {(n + 1) // 2} packed bytes for shape {shape}"
        )
    if not qi.HasField("absmax") or not qi.HasField("quant_map"):
        raise DescriptorError(f"tensor {name!r}: quant.absmax or quant.quant_map missing")
    code = m.map_ref(name + ".quant_map", qi.quant_map)
    if qi.quant_map.dtype != pb.DTYPE_F32:
        raise DescriptorError(f"tensor {name!r}: quant_map dtype {dtype_name(qi.quant_map.dtype)}, want DTYPE_F32")
    try:
        if qi.nested:
            if qi.absmax.dtype != pb.DTYPE_U8:
                raise DescriptorError(f"tensor {name!r}: nested absmax dtype {dtype_name(qi.absmax.dtype)}, want DTYPE_U8")
            if not qi.HasField("nested_absmax") or not qi.HasField("nested_quant_map"):
                raise DescriptorError(f"tensor {name!r}: nested quant without nested_absmax/nested_quant_map")
            absmax = restore_nested_absmax(
                m.map_ref(name + ".absmax", qi.absmax),
                m.map_ref(name + ".nested_quant_map", qi.nested_quant_map),
                m.map_ref(name + ".nested_absmax", qi.nested_absmax),
                int(qi.nested_blocksize or 256),
                float(np.float32(qi.nested_offset)),
            )
        else:
            if qi.absmax.dtype != pb.DTYPE_F32:
                raise DescriptorError(f"tensor {name!r}: absmax dtype {dtype_name(qi.absmax.dtype)}, want DTYPE_F32")
            absmax = m.map_ref(name + ".absmax", qi.absmax)
        if dtype is not None and np.dtype(dtype) != np.float32:
            raise ValueError(f"dequantize_nf4: dtype must be None or float32, got {dtype}")
        return dequantize_4bit_arrays(packed, absmax, code, int(qi.blocksize), shape, logical, widen=dtype is not None)
    except ValueError as e:
        if isinstance(e, DescriptorError):
            raise
        raise DescriptorError(f"tensor {name!r}: {e}") from e


# Sorted fp32 midpoints between neighbouring NF4 codes (the CUDA decision tree).
_NF4_THRESHOLDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


def quantize_nf4(x: np.ndarray, blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Quantize to NF4 by bitsandbytes' CUDA rule (non-nested), for tests and tools.

    Returns (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]). The
    scale is the IEEE fp32 reciprocal of absmax (bnb's fast-math reciprocal
    can differ by one ulp, which moves a code only at a threshold). A zero
    block gets code 0 and absmax 0, as on CUDA; odd n pads with code 7.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    nblocks = -(-n // blocksize)
    pad = np.zeros(nblocks * blocksize, dtype=np.float32)
    pad[:n] = flat
    blocks = pad.reshape(nblocks, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / absmax).astype(np.float32)
        xn = (blocks * inv[:, None]).astype(np.float32).reshape(-1)[:n]
    # q = count of thresholds strictly below xn; NaN compares false everywhere -> 0.
    q = np.searchsorted(_NF4_THRESHOLDS, xn, side="left").astype(np.uint8)
    q[np.isnan(xn)] = 0
    if n % 2:
        q = np.concatenate([q, np.array([7], dtype=np.uint8)])
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    return packed, absmax
