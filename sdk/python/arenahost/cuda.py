"""Zero-copy torch tensors over CUDA arena descriptors.

A descriptor whose region lies in a ``CUDASlab`` names a device allocation of
the host (one large ``cuMemAlloc`` slab) by its 64-byte legacy IPC handle, plus
the region's offset. :class:`CudaMapper` opens each slab once per process
(``cupy.cuda.runtime.ipcOpenMemHandle``: the driver allows one open per
context per device per process) and returns torch tensors that *alias* the
host's device memory through DLPack: no copy, writes are seen by the host.
Without cupy it opens the handle with the CUDA runtime torch has loaded
(ctypes) and hands torch a ``__cuda_array_interface__`` object instead.

torch and cupy are imported lazily, only when a tensor is made, so importing
this module (and the descriptor checks, which are plain Python) works on any
machine. The host completes the work behind a descriptor (a stream sync)
before handing it out, so a reader needs no event.

Lifetime: the IPC handle does not keep the slab alive, and the host keeps a
slab allocated while a plugin generation that received it is alive. Close a
mapper (``close()``) only after every tensor made from it is gone.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from dataclasses import dataclass
from typing import Sequence

try:
    from arenahost.tensor import DescriptorError
except Exception:  # noqa: BLE001 - a GPU box with torch and cupy but without (or with another) numpy/protobuf

    class DescriptorError(ValueError):
        """A descriptor that cannot be mapped: names the tensor and the field."""


__all__ = ["HANDLE_SIZE", "SlabInfo", "TensorLayout", "CudaMapper", "DescriptorError", "check_slab", "layout_of", "slab_info", "tensor_layout", "torch_dtype"]

HANDLE_SIZE = 64  # CU_IPC_HANDLE_SIZE

# Wire DType name -> (torch dtype attribute name, itemsize). bf16 is native
# in torch; cupy has none, so tensors are made as uint8 and viewed.
_TORCH = {
    "DTYPE_F32": ("float32", 4),
    "DTYPE_F16": ("float16", 2),
    "DTYPE_BF16": ("bfloat16", 2),
    "DTYPE_F64": ("float64", 8),
    "DTYPE_U8": ("uint8", 1),
    "DTYPE_I8": ("int8", 1),
    "DTYPE_I16": ("int16", 2),
    "DTYPE_I32": ("int32", 4),
    "DTYPE_I64": ("int64", 8),
    "DTYPE_BOOL": ("bool", 1),
    "DTYPE_F8_E4M3": ("float8_e4m3fn", 1),
    "DTYPE_F8_E5M2": ("float8_e5m2", 1),
    "DTYPE_U16": ("uint16", 2),
    "DTYPE_U32": ("uint32", 4),
    "DTYPE_U64": ("uint64", 8),
}


@dataclass(frozen=True)
class SlabInfo:
    """One device slab as a descriptor names it."""

    id: int
    handle: bytes  # the 64-byte CUipcMemHandle of the slab's base
    size: int
    device: int
    host_pid: int


@dataclass(frozen=True)
class TensorLayout:
    """Where a tensor lies in its slab and how to view it."""

    slab: SlabInfo
    offset: int  # byte offset of element 0 in the slab
    nbytes: int
    dtype: str  # torch dtype attribute name
    itemsize: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # contiguous, in elements


def slab_info(region, name: str = "") -> SlabInfo:
    """Check a region's CUDASlab and return it; DescriptorError names the field."""
    where = f"tensor {name!r}: " if name else ""
    if region.WhichOneof("segment") != "cuda":
        raise DescriptorError(f"{where}region is not on a CUDA slab (segment {region.WhichOneof('segment')})")
    s = region.cuda
    slab = check_slab(SlabInfo(id=s.id, handle=bytes(s.ipc_handle), size=s.size, device=s.device, host_pid=s.host_pid), where)
    end = region.offset + region.length
    if end > s.size:
        raise DescriptorError(
            f"{where}cuda slab {s.id}: region offset {region.offset} length {region.length} past the slab's {s.size} bytes"
        )
    return slab


def check_slab(slab: SlabInfo, where: str = "") -> SlabInfo:
    """Check a slab's fields (also for slabs that arrive as JSON, not protobuf)."""
    if slab.id <= 0:
        raise DescriptorError(f"{where}cuda slab id {slab.id}")
    if len(slab.handle) != HANDLE_SIZE:
        raise DescriptorError(f"{where}cuda slab {slab.id}: ipc_handle has {len(slab.handle)} bytes, want {HANDLE_SIZE}")
    if slab.size <= 0:
        raise DescriptorError(f"{where}cuda slab {slab.id}: size {slab.size}")
    if slab.device < 0:
        raise DescriptorError(f"{where}cuda slab {slab.id}: device {slab.device}")
    if slab.host_pid <= 0:
        raise DescriptorError(f"{where}cuda slab {slab.id}: host_pid {slab.host_pid}")
    return slab


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    from arenahost.plugin.v1 import plugin_pb2 as pb

    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return str(dtype)


def torch_dtype(dtype) -> tuple[str, int]:
    """The torch dtype name and itemsize of a wire DType (enum value or name, "DTYPE_BF16")."""
    try:
        return _TORCH[_dtype_name(dtype)]
    except KeyError:
        raise DescriptorError(f"dtype {_dtype_name(dtype)} has no torch equivalent") from None


def tensor_layout(desc) -> TensorLayout:
    """Check a CUDA descriptor and compute its view: slab, offset, dtype, shape, strides."""
    name = desc.name
    if not desc.HasField("region"):
        raise DescriptorError(f"tensor {name!r}: no region")
    slab = slab_info(desc.region, name)
    return layout_of(slab, desc.region.offset, desc.region.length, desc.dtype, desc.shape, desc.nbytes, name)


def layout_of(slab: SlabInfo, offset: int, length: int, dtype, shape, nbytes: int, name: str = "") -> TensorLayout:
    """The view of nbytes at offset of a slab region of length bytes, as dtype and shape."""
    check_slab(slab, f"tensor {name!r}: " if name else "")
    tname, size = torch_dtype(dtype)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise DescriptorError(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    numel = 1
    for d in shape:
        numel *= d
    if numel * size != nbytes:
        raise DescriptorError(f"tensor {name!r}: shape {list(shape)} of {_dtype_name(dtype)} is {numel * size} bytes, nbytes says {nbytes}")
    if nbytes > length:
        raise DescriptorError(f"tensor {name!r}: {nbytes} bytes in a region of {length}")
    if offset + length > slab.size:
        raise DescriptorError(f"tensor {name!r}: cuda slab {slab.id}: region offset {offset} length {length} past the slab's {slab.size} bytes")
    if offset % size:
        raise DescriptorError(f"tensor {name!r}: offset {offset} not aligned to {_dtype_name(dtype)}")
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return TensorLayout(slab=slab, offset=offset, nbytes=nbytes, dtype=tname, itemsize=size, shape=shape, strides=tuple(reversed(strides)))


class _CudaArray:
    """A raw device range for torch.as_tensor (``__cuda_array_interface__``
    v3); torch keeps it alive with the tensor, and it keeps its mapper."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self._owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_SIZE)]


def _cudart():
    """The CUDA runtime torch has loaded (its soname resolves to the loaded copy)."""
    import torch

    torch.cuda.init()
    names = ["libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so"]
    here = os.path.join(os.path.dirname(torch.__file__), "lib")
    names += sorted(glob.glob(os.path.join(here, "libcudart*.so*")))
    for n in names:
        try:
            lib = ctypes.CDLL(n)
        except OSError:
            continue
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]
        return lib
    raise DescriptorError("no CUDA runtime (libcudart) found next to torch")


class CudaMapper:
    """Opens CUDA slabs once per process and makes zero-copy torch tensors.

    ``tensor(desc)`` returns a torch tensor on ``cuda:<device>`` aliasing the
    host's bytes. Opened slabs are cached by (host_pid, slab id) until
    ``close()``. ``backend`` is ``"cupy"`` (``ipcOpenMemHandle`` + DLPack),
    ``"cudart"`` (the runtime torch loaded, through ctypes, + the CUDA array
    interface: torch alone suffices) or ``"auto"`` (cupy when importable).
    """

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "cupy", "cudart"):
            raise ValueError(f"backend {backend!r}: want auto, cupy or cudart")
        self._backend = backend
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], tuple[int, object, SlabInfo]] = {}  # key -> (base ptr, cupy memory or None, slab)
        self._rt = None

    def _use_cupy(self) -> bool:
        if self._backend == "auto":
            try:
                import cupy  # noqa: F401
            except ImportError:
                self._backend = "cudart"
            else:
                self._backend = "cupy"
        return self._backend == "cupy"

    def _slab(self, slab: SlabInfo):
        key = (slab.host_pid, slab.id)
        with self._lock:
            got = self._open.get(key)
            if got is not None:
                if got[2].handle != slab.handle or got[2].size != slab.size:
                    raise DescriptorError(f"cuda slab {slab.id}: handle changed since it was opened (host restarted?)")
                return got
            if self._use_cupy():
                import cupy

                with cupy.cuda.Device(slab.device):
                    ptr = cupy.cuda.runtime.ipcOpenMemHandle(slab.handle)
                    mem = cupy.cuda.UnownedMemory(ptr, slab.size, self, slab.device)
            else:
                if self._rt is None:
                    self._rt = _cudart()
                self._rt.cudaSetDevice(slab.device)
                p = ctypes.c_void_p()
                rc = self._rt.cudaIpcOpenMemHandle(ctypes.byref(p), _IpcHandle(slab.handle), 1)  # cudaIpcMemLazyEnablePeerAccess
                if rc != 0:
                    raise DescriptorError(f"cuda slab {slab.id}: cudaIpcOpenMemHandle: error {rc}")
                ptr, mem = p.value, None
            got = (ptr, mem, slab)
            self._open[key] = got
            return got

    def tensor(self, desc):
        """A torch tensor over the descriptor's bytes, no copy."""
        return self.tensor_at(tensor_layout(desc))

    def tensor_at(self, lay: TensorLayout):
        """A torch tensor over a checked layout (see layout_of), no copy."""
        import torch

        ptr, mem, _ = self._slab(lay.slab)
        if mem is not None:
            import cupy

            with cupy.cuda.Device(lay.slab.device):
                raw = cupy.ndarray((lay.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, lay.offset))
                t = torch.from_dlpack(raw)
        else:
            t = torch.as_tensor(_CudaArray(ptr + lay.offset, lay.nbytes, self), device=f"cuda:{lay.slab.device}")
        return t.view(getattr(torch, lay.dtype)).view(lay.shape)

    def opened(self) -> Sequence[SlabInfo]:
        with self._lock:
            return [v[2] for v in self._open.values()]

    def close(self) -> None:
        """Close every opened slab: only after all tensors made from it are gone."""
        with self._lock:
            items, self._open = list(self._open.values()), {}
        for ptr, mem, slab in items:
            if mem is not None:
                import cupy

                with cupy.cuda.Device(slab.device):
                    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            else:
                self._rt.cudaSetDevice(slab.device)
                self._rt.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))
