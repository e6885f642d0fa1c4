"""Optional torch helpers (``pip install arenahost[torch]``); torch is imported on first use.

Nothing else in the SDK imports this module, so the core package runs where
torch is absent. Here:

* :func:`as_tensor`: a CPU descriptor as a torch tensor with no copy (over the
  same shared mapping as :func:`arenahost.tensor.map_descriptor`; BF16 is a
  real ``torch.bfloat16`` view). A read-only descriptor is mapped PROT_READ:
  writing its tensor faults, so treat it as read-only.
* :func:`dequantize_nf4`: the bit-exact NumPy dequantization as a torch tensor
  in the weight's logical dtype.
* :func:`linear_forward`: the side-mode forward ``x·Wᵀ + (x·A_catᵀ)·B_catᵀ (+ bias)``.
* :func:`dequantize_4bit`: the same bnb rule with torch ops, optionally for a
  row range only (what a split layer of a fused weight reads).
* :class:`FactorWatcher`: one ``LookupTensors(include_factors=True)`` per
  poll for every arena layer of a model; bumps an epoch when a weight region
  or a factor binding changed.
* :class:`ArenaNF4Linear` (a ``torch.nn.Module``): a Linear over arena
  descriptors with rebindable side factors; :mod:`arenahost.diffusers_flux`
  patches diffusers Flux transformers with it.

CUDA descriptors (cuIpc handles) come later: these helpers map CPU segments.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Any

import numpy as np

from arenahost import nf4 as _nf4
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper, default_mapper

__all__ = [
    "available", "as_tensor", "dequantize_nf4", "dequantize_4bit", "weight_tensor", "linear_forward",
    "FactorWatcher", "ArenaNF4Linear",
]


def available() -> bool:
    """Whether torch can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError("arenahost.torch needs torch; install the optional extra: pip install 'arenahost[torch]'") from e
    return torch


def _from_numpy(arr: np.ndarray):
    torch = _torch()
    with warnings.catch_warnings():
        # Read-only mappings: torch warns that it cannot protect them; the mapping itself is PROT_READ.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def as_tensor(desc: pb.TensorDescriptor, mapper: Mapper | None = None, writable: bool | None = None):
    """Zero-copy torch tensor over a CPU descriptor (BF16 as torch.bfloat16, F8 as
    torch.float8_e4m3fn / float8_e5m2)."""
    torch = _torch()
    m = mapper if mapper is not None else default_mapper()
    arr = m.map(desc, writable)
    t = _from_numpy(arr)
    if desc.dtype == pb.DTYPE_BF16:
        t = t.view(torch.bfloat16)
    elif desc.dtype == pb.DTYPE_F8_E4M3:
        t = t.view(torch.float8_e4m3fn)
    elif desc.dtype == pb.DTYPE_F8_E5M2:
        t = t.view(torch.float8_e5m2)
    return t


def dequantize_nf4(desc: pb.TensorDescriptor, mapper: Mapper | None = None):
    """Bit-exact bitsandbytes dequantization of a 4-bit weight descriptor, as a torch tensor."""
    torch = _torch()
    out = _nf4.dequantize_nf4(desc, mapper)
    t = torch.from_numpy(np.ascontiguousarray(out))
    if desc.quant.dtype == pb.DTYPE_BF16:
        t = t.view(torch.bfloat16)
    return t


def linear_forward(x, w, bias=None, factors: Any = None):
    """y = x·Wᵀ + Σ (x·Aᵀ)·Bᵀ + bias with torch ops, in x's dtype.

    factors: None, one (A, B) pair or a sequence of pairs; A [R × in], B [out × R].
    """
    torch = _torch()
    F = torch.nn.functional
    y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if factors is None:
        return y
    pairs = [factors] if isinstance(factors, tuple) and len(factors) == 2 and torch.is_tensor(factors[0]) else list(factors)
    for i, (a, b) in enumerate(pairs):
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(f"linear_forward: factors[{i}] A{list(a.shape)} B{list(b.shape)} do not fit weight {list(w.shape)}")
        y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
    return y


# --- bit-exact 4-bit dequantization in torch ------------------------------

_LOGICAL_TORCH = {pb.DTYPE_F32: "float32", pb.DTYPE_F16: "float16", pb.DTYPE_BF16: "bfloat16"}
_CHUNK = 1 << 22  # elements per pass: bounds the int64/fp32 temporaries whatever the layer size


def _ref_tensor(m: Mapper, name: str, ref: pb.TensorRef):
    return _from_numpy(m.map_ref(name, ref))


def _absmax_f32(desc: pb.TensorDescriptor, m: Mapper):
    """The fp32 absmax of a 4-bit weight, restoring nested absmax by bnb's rule."""
    torch = _torch()
    qi, name = desc.quant, desc.name
    if not qi.HasField("absmax"):
        raise DescriptorError(f"tensor {name!r}: quant.absmax missing")
    if not qi.nested:
        if qi.absmax.dtype != pb.DTYPE_F32:
            raise DescriptorError(f"tensor {name!r}: absmax dtype {pb.DType.Name(qi.absmax.dtype)}, want DTYPE_F32")
        return _ref_tensor(m, name + ".absmax", qi.absmax).reshape(-1)
    if qi.absmax.dtype != pb.DTYPE_U8:
        raise DescriptorError(f"tensor {name!r}: nested absmax dtype {pb.DType.Name(qi.absmax.dtype)}, want DTYPE_U8")
    if not qi.HasField("nested_absmax") or not qi.HasField("nested_quant_map"):
        raise DescriptorError(f"tensor {name!r}: nested quant without nested_absmax/nested_quant_map")
    q = _ref_tensor(m, name + ".absmax", qi.absmax).reshape(-1).long()
    code = _ref_tensor(m, name + ".nested_quant_map", qi.nested_quant_map).reshape(-1).float()
    nabs = _ref_tensor(m, name + ".nested_absmax", qi.nested_absmax).reshape(-1).float()
    nbs = int(qi.nested_blocksize or 256)
    need = -(-q.numel() // nbs)
    if code.numel() != 256 or nabs.numel() < need:
        raise DescriptorError(f"tensor {name!r}: nested_quant_map has {code.numel()} values (want 256), "
                              f"nested_absmax {nabs.numel()} (want {need})")
    scale = nabs[:need].repeat_interleave(nbs)[: q.numel()]
    # fp32(fp32(code[q]·nabs) + offset): two separately rounded fp32 ops, as bnb.
    return (code[q] * scale) + torch.tensor(float(np.float32(qi.nested_offset)), dtype=torch.float32)


def dequantize_4bit(desc: pb.TensorDescriptor, mapper: Mapper | None = None, *, rows: tuple[int, int] | None = None,
                    dtype=None, absmax=None):
    """Dequantize a bitsandbytes 4-bit weight descriptor with torch ops, bit-exact with bnb.

    The rule of ``bitsandbytes.functional.dequantize_4bit``: element k is
    ``T(fp32(code[q_k] · absmax[k // blocksize]))``, high nibble first,
    rounded to the logical dtype T (``dtype=torch.float32`` then widens those
    values exactly). ``rows=(r0, n)`` returns rows [r0, r0+n) of the 2-D
    weight and reads only their bytes: the same values as dequantizing the
    whole weight and slicing (blocks are indexed by element). ``absmax`` may
    pass a restored fp32 absmax to skip restoring it again.
    """
    torch = _torch()
    m = mapper if mapper is not None else default_mapper()
    name = desc.name
    if not desc.HasField("quant"):
        raise DescriptorError(f"tensor {name!r}: not quantized (no quant info)")
    qi = desc.quant
    if qi.quant_type not in ("nf4", "fp4"):
        raise DescriptorError(f"tensor {name!r}: quant.quant_type {qi.quant_type!r} is not nf4 or fp4")
    logical = _LOGICAL_TORCH.get(qi.dtype)
    if logical is None:
        raise DescriptorError(f"tensor {name!r}: quant.dtype {pb.DType.Name(qi.dtype)} is not F32, F16 or BF16")
    shape = [int(d) for d in qi.shape]
    if len(shape) != 2 and rows is not None:
        raise DescriptorError(f"tensor {name!r}: rows need a 2-D weight, quant.shape is {shape}")
    n = math.prod(shape) if shape else 0
    if n == 0:
        raise DescriptorError(f"tensor {name!r}: quant.shape {shape} is empty")
    bs = int(qi.blocksize)
    if bs <= 0:
        raise DescriptorError(f"tensor {name!r}: quant.blocksize {bs} must be positive")
    if desc.region.length < (n + 1) // 2:
        raise DescriptorError(f"tensor {name!r}: region length {desc.region.length} < {(n + 1) // 2} packed bytes for shape {shape}")
    if not qi.HasField("quant_map") or qi.quant_map.dtype != pb.DTYPE_F32:
        raise DescriptorError(f"tensor {name!r}: quant.quant_map missing or not DTYPE_F32")
    code = _ref_tensor(m, name + ".quant_map", qi.quant_map).reshape(-1)
    if code.numel() != 16:
        raise DescriptorError(f"tensor {name!r}: quant_map has {code.numel()} values, want 16")
    am = absmax if absmax is not None else _absmax_f32(desc, m)
    if am.numel() < -(-n // bs):
        raise DescriptorError(f"tensor {name!r}: absmax has {am.numel()} values, {n} elements at blocksize {bs} need {-(-n // bs)}")
    if rows is None:
        s, e, out_shape = 0, n, shape
    else:
        r0, nr = int(rows[0]), int(rows[1])
        if r0 < 0 or nr <= 0 or r0 + nr > shape[0]:
            raise DescriptorError(f"tensor {name!r}: rows [{r0}, {r0 + nr}) outside [0, {shape[0]})")
        s, e, out_shape = r0 * shape[1], (r0 + nr) * shape[1], [nr, shape[1]]
    packed = _from_numpy(m.bytes(name, desc.region, (n + 1) // 2))
    target = getattr(torch, logical)
    if s % bs == 0 and (e - s) % bs == 0 and bs % 2 == 0:
        # Whole blocks: decode byte pairs through a 256-entry table and scale each block row at once.
        pairs = torch.stack([code[torch.arange(256) >> 4], code[torch.arange(256) & 0x0F]], 1)  # [256, 2] fp32
        outs = []
        step = max(bs, (_CHUNK // bs) * bs)
        for c0 in range(s, e, step):
            c1 = min(e, c0 + step)
            v = pairs[packed[c0 // 2 : c1 // 2].long()].reshape(-1, bs)
            v = v * am[c0 // bs : c1 // bs, None]  # fp32 · fp32, rounded once
            v = v.reshape(-1).to(target)  # round to nearest even
            outs.append(v if dtype is None else v.to(torch.float32))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(out_shape)
    out = torch.empty(e - s, dtype=torch.float32 if dtype is not None else target)
    for c0 in range(s, e, _CHUNK):
        c1 = min(e, c0 + _CHUNK)
        b0 = c0 // 2
        b = packed[b0 : (c1 + 1) // 2]
        q = torch.empty(2 * b.numel(), dtype=torch.uint8)
        q[0::2] = b >> 4  # element 2j is the high nibble
        q[1::2] = b & 0x0F
        q = q[c0 - 2 * b0 : c0 - 2 * b0 + (c1 - c0)]
        idx = torch.arange(c0, c1, dtype=torch.int64) // bs
        v = code[q.long()] * am[idx]  # fp32 · fp32, rounded once
        v = v.to(target)  # round to nearest even
        out[c0 - s : c1 - s] = v if dtype is None else v.to(torch.float32)
    return out.reshape(out_shape)


def weight_tensor(desc: pb.TensorDescriptor, mapper: Mapper | None = None, *, rows: tuple[int, int] | None = None):
    """A 2-D weight as fp32: dequantized if 4-bit, widened (or viewed, for F32) otherwise."""
    torch = _torch()
    if desc.HasField("quant"):
        return dequantize_4bit(desc, mapper, rows=rows, dtype=torch.float32)
    t = as_tensor(desc, mapper, writable=False)
    if t.dim() != 2:
        raise DescriptorError(f"tensor {desc.name!r}: weight shape {list(t.shape)} is not 2-D")
    if rows is not None:
        t = t[rows[0] : rows[0] + rows[1]]
    return t.float()


# --- factor bindings, polled once per step --------------------------------


def _weight_key(name: str) -> str:
    return name if name.endswith(".weight") else name + ".weight"


class FactorWatcher:
    """One LookupTensors per poll for every layer of a patched model.

    The host binds LoRA side factors to layers (``LayerFactors{layer, a, b,
    binding_generation}``) and may rewrite weights (fuse mode). A watcher
    asks for all the weights, biases and bindings a set of arena modules
    reads in one call and bumps :attr:`epoch` when any of them changed; each
    :class:`ArenaNF4Linear` compares the epoch it last saw on its next
    forward and re-maps only what changed. :func:`patch_pipeline` polls once
    per transformer call (a forward pre-hook), i.e. once per denoising step,
    so an apply, strength change or remove is used from the next step with
    no reload.
    """

    def __init__(self, host, model: str = "", names=(), mapper: Mapper | None = None):
        self.host = host
        self.model = model
        self.names = sorted(set(names))
        self.mapper = mapper if mapper is not None else getattr(host, "mapper", None) or default_mapper()
        self.tensors: dict[str, pb.TensorDescriptor] = {}
        self.factors: dict[str, pb.LayerFactors] = {}
        self.epoch = 0
        self.polls = 0
        self._sig = None

    def add(self, *names: str) -> None:
        self.names = sorted(set(self.names).union(n for n in names if n))

    @staticmethod
    def _region_sig(d) -> tuple:
        r = d.region
        return (r.cpu.host_pid, r.cpu.id, r.offset, r.length, r.generation)

    def poll(self) -> bool:
        """Ask the host once; returns True (and bumps epoch) when anything changed."""
        resp = self.host.lookup_tensors(model=self.model, names=self.names, include_factors=True)
        self.polls += 1
        tensors = {d.name: d for d in resp.tensors}
        factors = {_weight_key(f.layer): f for f in resp.factors if f.HasField("a") and f.HasField("b")}
        sig = (
            tuple(sorted((n, self._region_sig(d), self._region_sig(d.quant.absmax) if d.HasField("quant") else ()) for n, d in tensors.items())),
            tuple(sorted((n, f.binding_generation, self._region_sig(f.a), self._region_sig(f.b)) for n, f in factors.items())),
        )
        if sig == self._sig:
            return False
        self.tensors, self.factors, self._sig = tensors, factors, sig
        self.epoch += 1
        return True


def _nn():
    return _torch().nn


class _LazyModuleBase:
    """Resolved at first use so that importing arenahost.torch never imports torch."""

    cls = None


def _arena_linear_class():
    if _LazyModuleBase.cls is not None:
        return _LazyModuleBase.cls
    torch = _torch()
    F = torch.nn.functional

    class ArenaNF4Linear(torch.nn.Module):
        """A Linear layer whose weight, bias and LoRA side factors live in the arena.

        ``weight``: the arena weight name (a bitsandbytes 4-bit weight, or a
        plain F32/F16/BF16 one); ``bias``: its bias name or None; ``rows``:
        the row segments ``[(start, count), ...]`` of that weight this layer
        computes, in output order (None: all rows). A split layer (diffusers
        ``to_q`` of a fused BFL ``qkv``) names its row slice; the weight is
        dequantized by bnb's rule and sliced, and the bound B_cat's rows are
        sliced the same way (A_cat is shared). forward is
        ``x·Wᵀ + bias + (x·A_catᵀ)·B_catᵀ``, computed in x's dtype.

        cache_weight=True keeps the dequantized weight (fp32) between
        forwards and re-dequantizes when the host's region for it changes;
        False dequantizes on every forward (bnb's Linear4bit memory profile).
        """

        def __init__(self, watcher: FactorWatcher, weight: str, bias: str | None, in_features: int, out_features: int,
                     rows=None, *, cache_weight: bool = True):
            super().__init__()
            self.watcher = watcher
            self.weight_name = weight
            self.bias_name = bias
            self.in_features = int(in_features)
            self.out_features = int(out_features)
            self.rows = [(int(a), int(b)) for a, b in rows] if rows else None
            if self.rows and sum(c for _, c in self.rows) != self.out_features:
                raise ValueError(f"{weight}: row segments {self.rows} do not add up to {out_features} outputs")
            self.cache_weight = cache_weight
            self._epoch = -1
            self._wsig = None
            self._w = None
            self._b = None
            self._bsig = None
            self._fgen = None
            self._a = None
            self._bf = None
            self.binding_generation = 0
            watcher.add(weight, bias or "")

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_name!r}, "
                    f"rows={self.rows}, factors={'bound gen %d' % self.binding_generation if self._a is not None else 'none'}")

        # -- pulling from the watcher --

        def _rowsel(self, t):
            if not self.rows:
                return t
            parts = [t[s : s + c] for s, c in self.rows]
            return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

        def _dequant(self, d):
            m = self.watcher.mapper
            if d.HasField("quant"):
                shape = list(d.quant.shape)
                if len(shape) != 2 or shape[1] != self.in_features:
                    raise DescriptorError(f"tensor {d.name!r}: shape {shape} does not fit a layer with {self.in_features} inputs")
                am = _absmax_f32(d, m)
                if not self.rows:
                    w = dequantize_4bit(d, m, dtype=torch.float32, absmax=am)
                else:
                    parts = [dequantize_4bit(d, m, rows=r, dtype=torch.float32, absmax=am) for r in self.rows]
                    w = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            else:
                w = self._rowsel(weight_tensor(d, m))
            if tuple(w.shape) != (self.out_features, self.in_features):
                raise DescriptorError(f"tensor {d.name!r}: rows {self.rows} give {list(w.shape)}, layer is "
                                      f"[{self.out_features}, {self.in_features}]")
            return w

        def _sync(self):
            wt = self.watcher
            if wt.epoch == self._epoch:
                return
            d = wt.tensors.get(self.weight_name)
            if d is None:
                raise DescriptorError(f"model {wt.model!r}: the host has no tensor {self.weight_name!r} (unloaded?)")
            sig = FactorWatcher._region_sig(d) + ((FactorWatcher._region_sig(d.quant.absmax),) if d.HasField("quant") else ())
            if sig != self._wsig:
                self._w = self._dequant(d) if self.cache_weight else None
                self._wsig, self._wdesc = sig, d
            if self.bias_name:
                bd = wt.tensors.get(self.bias_name)
                if bd is None:
                    raise DescriptorError(f"model {wt.model!r}: the host has no tensor {self.bias_name!r}")
                bsig = FactorWatcher._region_sig(bd)
                if bsig != self._bsig:
                    self._b = self._rowsel(as_tensor(bd, wt.mapper, writable=False).reshape(-1)).float()
                    self._bsig = bsig
            lf = wt.factors.get(_weight_key(self.weight_name))
            fsig = None if lf is None else (lf.binding_generation, FactorWatcher._region_sig(lf.a), FactorWatcher._region_sig(lf.b))
            if fsig != self._fgen:
                if lf is None:
                    self._a = self._bf = None
                    self.binding_generation = 0
                else:
                    a = as_tensor(lf.a, wt.mapper, writable=False)
                    b = as_tensor(lf.b, wt.mapper, writable=False)
                    src_out = d.quant.shape[0] if d.HasField("quant") else d.shape[0]
                    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != self.in_features or b.shape[0] != src_out or a.shape[0] != b.shape[1]:
                        raise DescriptorError(f"layer {self.weight_name!r}: factors A{list(a.shape)} B{list(b.shape)} do not fit "
                                              f"weight [{src_out}, {self.in_features}]")
                    # Factors stay in their stored dtype (F32, or BF16 with the host's
                    # factor_dtype bf16): the forward casts them to x's dtype, which a
                    # bfloat16 forward does to F32 factors too (the same bits either way).
                    bsel = self._rowsel(b)
                    if self.rows:
                        # A split layer's rows of B_cat are zero in the columns of the other parts'
                        # factors (a LoRA on to_q says nothing about to_k): drop those ranks. They
                        # only ever added x·0 (same sums up to fp32 summation order).
                        nz = (bsel != 0).any(0)
                        if not bool(nz.all()):
                            a, bsel = a[nz], bsel[:, nz].contiguous()
                    self._a, self._bf = a, bsel
                    self.binding_generation = int(lf.binding_generation)
                self._fgen = fsig
            self._epoch = wt.epoch

        def dequantized_weight(self):
            """The layer's weight as the host holds it now (fp32, this layer's rows)."""
            self._sync()
            return self._w if self._w is not None else self._dequant(self._wdesc)

        def factors(self):
            """(A_cat, B_cat rows of this layer) bound now, or None."""
            self._sync()
            return None if self._a is None else (self._a, self._bf)

        def forward(self, x):
            self._sync()
            w = self._w if self._w is not None else self._dequant(self._wdesc)
            dt = x.dtype
            y = F.linear(x, w if w.dtype == dt else w.to(dt), None if self._b is None else self._b.to(dt))
            if self._a is not None and self._a.shape[0]:
                y = y + F.linear(F.linear(x, self._a.to(dt)), self._bf.to(dt))
            return y

    _LazyModuleBase.cls = ArenaNF4Linear
    return ArenaNF4Linear


def __getattr__(name: str):
    # ArenaNF4Linear subclasses torch.nn.Module, so it is built on first access.
    if name == "ArenaNF4Linear":
        return _arena_linear_class()
    raise AttributeError(f"module 'arenahost.torch' has no attribute {name!r}")
