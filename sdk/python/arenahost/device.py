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
=============================  =============================================

A plugin started outside a host (tests, a shell) gets the defaults: cpu,
device 0, torch device ``cpu``.
"""

from __future__ import annotations

import os
import re

__all__ = ["ENV_ARENA_BACKEND", "ENV_DEVICE", "ENV_TORCH_DEVICE", "arena_backend", "device_ordinal", "torch_device"]

ENV_ARENA_BACKEND = "ARENAHOST_ARENA_BACKEND"
ENV_DEVICE = "ARENAHOST_DEVICE"
ENV_TORCH_DEVICE = "ARENAHOST_TORCH_DEVICE"

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
