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

CUDA descriptors (cuIpc handles) and the NF4 Linear module / pipeline patching
come with the torch pipeline work (issue 8).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np

from arenahost import nf4 as _nf4
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper, default_mapper

__all__ = ["available", "as_tensor", "dequantize_nf4", "linear_forward"]


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
    """Zero-copy torch tensor over a CPU descriptor (BF16 as torch.bfloat16)."""
    torch = _torch()
    m = mapper if mapper is not None else default_mapper()
    if desc.dtype in (pb.DTYPE_F8_E4M3, pb.DTYPE_F8_E5M2):
        raise DescriptorError(f"tensor {desc.name!r}: fp8 descriptors are not supported by arenahost.torch yet")
    arr = m.map(desc, writable)
    t = _from_numpy(arr)
    if desc.dtype == pb.DTYPE_BF16:
        t = t.view(torch.bfloat16)
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
