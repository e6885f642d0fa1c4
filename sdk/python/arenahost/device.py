"""The device a plugin serves: its host's ``--arena-device``.

One arenahost host serves one device, and every plugin it starts gets the
host's choice in its environment (set by the host, never by hand):

=============================  =============================================
``ARENAHOST_ARENA_BACKEND``    the host's arena backend: cpu, cuda, cuda-sim
``ARENAHOST_DEVICE``           the device ordinal (``--arena-device``), in the
                               host's numbering: ``CUDA_VISIBLE_DEVICES`` is
                               passed on unchanged, so it equals the ``device``
                               of every CUDA descriptor the host sends
``ARENAHOST_TORCH_DEVICE``     where a pipeline computes: ``cuda:N`` on the
                               cuda backend, ``cpu`` otherwise
``ARENAHOST_TORCH_MEMORY_CAP`` optional (set by hand, inherited from the
                               host's environment): the most device memory
                               the pipeline's torch allocator may hold, as a
                               size (``12GiB``, ``24GB``, a byte count);
                               :func:`apply_torch_memory_cap` enforces it with
                               ``torch.cuda.set_per_process_memory_fraction``
                               so a pipeline that needs more fails with
                               ``torch.cuda.OutOfMemoryError``, as on a card
                               that size. With the arena's capacity
                               (``--arena-capacity``) it caps a run's whole
                               device memory: arena + every pipeline process
=============================  =============================================

A plugin started outside a host (tests, a shell) gets the defaults: cpu,
device 0, torch device ``cpu``.
"""

from __future__ import annotations

import os
import re

__all__ = ["ENV_ARENA_BACKEND", "ENV_DEVICE", "ENV_TORCH_DEVICE", "ENV_TORCH_MEMORY_CAP", "arena_backend", "device_ordinal",
           "torch_device", "torch_memory_cap", "apply_torch_memory_cap", "parse_size"]

ENV_ARENA_BACKEND = "ARENAHOST_ARENA_BACKEND"
ENV_DEVICE = "ARENAHOST_DEVICE"
ENV_TORCH_DEVICE = "ARENAHOST_TORCH_DEVICE"
ENV_TORCH_MEMORY_CAP = "ARENAHOST_TORCH_MEMORY_CAP"

_BACKENDS = ("cpu", "cuda", "cuda-sim")
_TORCH_DEVICE = re.compile(r"^(cpu|cuda:(0|[1-9][0-9]{0,3}))$")


def _env(environ):
    return os.environ if environ is None else environ


def arena_backend(environ=None) -> str:
    """The host's arena backend (``ARENAHOST_ARENA_BACKEND``, default cpu)."""
    v = _env(environ).get(ENV_ARENA_BACKEND, "") or "cpu"
    if v not in _BACKENDS:
        raise ValueError(f"{ENV_ARENA_BACKEND}={v!r}: want one of {', '.join(_BACKENDS)}")
    return v


def device_ordinal(environ=None) -> int:
    """The host's device ordinal (``ARENAHOST_DEVICE``, default 0)."""
    v = _env(environ).get(ENV_DEVICE, "") or "0"
    if not v.isdigit() or len(v) > 4:
        raise ValueError(f"{ENV_DEVICE}={v!r}: want a device ordinal (0, 1, ...)")
    return int(v)


def torch_device(environ=None) -> str:
    """The torch device string a pipeline computes on (``ARENAHOST_TORCH_DEVICE``, default cpu)."""
    v = _env(environ).get(ENV_TORCH_DEVICE, "") or "cpu"
    if not _TORCH_DEVICE.match(v):
        raise ValueError(f"{ENV_TORCH_DEVICE}={v!r}: want 'cpu' or 'cuda:N'")
    return v


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(v: str) -> int:
    """A size as the host's settings write it (``12GiB``, ``24GB``, ``512MiB``, a byte count) in bytes."""
    m = _SIZE.match(v or "")
    if not m:
        raise ValueError(f"{v!r}: want a size such as 12GiB, 24GB or a byte count")
    n = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
    if n < 1 or n > 1 << 50:
        raise ValueError(f"{v!r}: out of range (1B to 1PiB)")
    return int(n)


def torch_memory_cap(environ=None) -> int | None:
    """The device-memory cap in bytes (``ARENAHOST_TORCH_MEMORY_CAP``), None when unset or empty."""
    v = _env(environ).get(ENV_TORCH_MEMORY_CAP, "")
    if not v:
        return None
    try:
        return parse_size(v)
    except ValueError as e:
        raise ValueError(f"{ENV_TORCH_MEMORY_CAP}={e}") from None


def apply_torch_memory_cap(environ=None, *, torch_module=None) -> str:
    """Enforce ``ARENAHOST_TORCH_MEMORY_CAP`` on this process's torch allocator; returns what it did.

    On a ``cuda:N`` torch device it sets ``torch.cuda.set_per_process_memory_fraction(cap / total, N)``
    (a cap above the card's memory is clamped to all of it). On the CPU there
    is no device allocator to cap: it does nothing and says so. Call it before
    the pipeline allocates on the device; calling it again sets the same
    fraction.
    """
    cap = torch_memory_cap(environ)
    dev = torch_device(environ)
    if cap is None:
        return "no cap"
    if not dev.startswith("cuda:"):
        return f"cap {cap} bytes not applied: torch computes on {dev}, which has no device allocator to cap"
    torch = torch_module
    if torch is None:
        import torch
    idx = int(dev.split(":", 1)[1])
    total = torch.cuda.get_device_properties(idx).total_memory
    frac = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(frac, idx)
    return f"cap {cap} bytes of {total} on {dev}: per-process memory fraction {frac:.4f}"
