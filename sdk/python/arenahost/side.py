"""Side-mode LoRA forward helper (NumPy): y = x·Wᵀ + (x·A_catᵀ)·B_catᵀ (+ bias).

In side mode the NF4 bytes are never rewritten: the LoRA engine publishes, per
target layer, concatenated factors A_cat [R × in] and B_cat [out × R] with
strength·scale folded into B_cat, bound to the layer in the host registry. A
pipeline computes the base product on the dequantized weight and adds the
low-rank term, which costs O(R·(in+out)) per row instead of a dense delta.

:class:`ArenaLinear` wraps one arena layer: it dequantizes its weight once per
weight generation and re-maps the side factors whenever the host's binding
generation changes, so a LoRA apply, strength change or remove is used by the
next forward with no reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.nf4 import dequantize_nf4
from arenahost.tensor import DescriptorError, Mapper, as_float32, default_mapper

__all__ = ["linear_forward", "Factors", "ArenaLinear", "load_factors", "weight_float32"]


@dataclass(frozen=True)
class Factors:
    """Bound side factors of one layer, as float32 arrays: A [R × in], B [out × R]."""

    a: np.ndarray
    b: np.ndarray
    binding_generation: int = 0


FactorsLike = Optional[Sequence[Tuple[np.ndarray, np.ndarray]] | Factors | Tuple[np.ndarray, np.ndarray]]


def _pairs(factors: FactorsLike) -> list[tuple[np.ndarray, np.ndarray]]:
    if factors is None:
        return []
    if isinstance(factors, Factors):
        return [(factors.a, factors.b)]
    if isinstance(factors, tuple) and len(factors) == 2 and isinstance(factors[0], np.ndarray):
        return [factors]  # one (A, B) pair
    out = []
    for f in factors:
        out.append((f.a, f.b) if isinstance(f, Factors) else (f[0], f[1]))
    return out


def linear_forward(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, factors: FactorsLike = None) -> np.ndarray:
    """y = x·Wᵀ + Σ (x·Aᵀ)·Bᵀ + bias, in float32 (or x's float64).

    x: [..., in]; w: [out, in] (the dequantized weight); bias: [out] or None;
    factors: None, one (A, B) pair, a Factors, or a sequence of them, with
    A [R × in] and B [out × R] (scale and strength already folded into B).
    """
    x = np.asarray(x)
    ct = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(ct, copy=False)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"linear_forward: weight must be 2-D [out, in], got shape {list(w.shape)}")
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"linear_forward: x has {x.shape[-1]} features, weight expects {in_f}")
    y = np.matmul(x, w.astype(ct, copy=False).T)
    for i, (a, b) in enumerate(_pairs(factors)):
        a = np.asarray(a).astype(ct, copy=False)
        b = np.asarray(b).astype(ct, copy=False)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"linear_forward: factors[{i}] A{list(a.shape)} B{list(b.shape)} do not fit weight [{out_f}, {in_f}] "
                f"(want A [R, {in_f}], B [{out_f}, R])"
            )
        if a.shape[0]:
            y += np.matmul(np.matmul(x, a.T), b.T)
    if bias is not None:
        bias = np.asarray(bias).astype(ct, copy=False)
        if bias.shape != (out_f,):
            raise ValueError(f"linear_forward: bias shape {list(bias.shape)}, want [{out_f}]")
        y += bias
    return y


def weight_float32(desc: pb.TensorDescriptor, mapper: Mapper | None = None) -> np.ndarray:
    """A 2-D float32 weight from a descriptor: dequantized if 4-bit, widened if bf16/f16."""
    m = mapper if mapper is not None else default_mapper()
    if desc.HasField("quant"):
        w = dequantize_nf4(desc, m, dtype=np.float32)
    else:
        w = as_float32(m.map(desc, writable=False), desc.dtype)
    if w.ndim != 2:
        raise DescriptorError(f"tensor {desc.name!r}: weight shape {list(w.shape)} is not 2-D")
    return w


def load_factors(lf: pb.LayerFactors, mapper: Mapper | None = None) -> Factors:
    """Map a LayerFactors' A and B (zero-copy for F32, widened otherwise)."""
    m = mapper if mapper is not None else default_mapper()
    a = as_float32(m.map(lf.a, writable=False), lf.a.dtype)
    b = as_float32(m.map(lf.b, writable=False), lf.b.dtype)
    return Factors(a=a, b=b, binding_generation=lf.binding_generation)


class ArenaLinear:
    """One arena-backed linear layer with rebindable side factors."""

    def __init__(self, weight: pb.TensorDescriptor, bias: pb.TensorDescriptor | None = None, mapper: Mapper | None = None):
        self.mapper = mapper if mapper is not None else default_mapper()
        self.name = weight.name
        self._wkey = None
        self.w: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.factors: Factors | None = None
        self.set_weight(weight, bias)

    def set_weight(self, weight: pb.TensorDescriptor, bias: pb.TensorDescriptor | None = None) -> None:
        key = (weight.region.cpu.host_pid, weight.region.cpu.id, weight.region.offset, weight.region.generation)
        if key != self._wkey:
            self.w = weight_float32(weight, self.mapper)
            self._wkey = key
        self.bias = None if bias is None else as_float32(self.mapper.map(bias, writable=False), bias.dtype).reshape(-1)

    def bind(self, lf: pb.LayerFactors | None) -> bool:
        """Use these factors from the next forward; None unbinds. Returns True if changed."""
        if lf is None or not lf.HasField("a"):
            changed = self.factors is not None
            self.factors = None
            return changed
        if self.factors is not None and self.factors.binding_generation == lf.binding_generation and lf.binding_generation:
            return False
        self.factors = load_factors(lf, self.mapper)
        return True

    @property
    def out_features(self) -> int:
        return int(self.w.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.w.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return linear_forward(x, self.w, self.bias, self.factors)
