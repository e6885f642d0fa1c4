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

Simulated device: a host running the simulated GPU (``shared/gpu/gpusim``,
arena backend ``cuda-sim``, for machines without a GPU) hands out the same
``CUDASlab`` descriptors, but its slabs are memfd shared memory and its
64-byte handle is ``b"ARENASIM"`` followed by little-endian u32 version (1),
u32 pid, u32 fd, u32 reserved (0), u64 size, then zeros. :class:`CudaMapper`
recognises such a handle and maps ``/proc/<pid>/fd/<fd>`` (MAP_SHARED,
read-write) once per slab per process instead of opening a driver handle:
:meth:`CudaMapper.array` returns a zero-copy NumPy view of the region and
:meth:`CudaMapper.tensor` a zero-copy torch *CPU* tensor (``torch.from_numpy``)
over the very pages the host allocated. It is for development and tests,
never a GPU.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

try:
    from arenahost.tensor import DescriptorError
except Exception:  # noqa: BLE001 - a GPU box with torch and cupy but without (or with another) numpy/protobuf

    class DescriptorError(ValueError):
        """A descriptor that cannot be mapped: names the tensor and the field."""


__all__ = [
    "HANDLE_SIZE",
    "SIM_MAGIC",
    "SlabInfo",
    "SimHandle",
    "TensorLayout",
    "CudaMapper",
    "DescriptorError",
    "check_slab",
    "is_sim_handle",
    "layout_of",
    "parse_sim_handle",
    "slab_info",
    "tensor_layout",
    "torch_dtype",
]

HANDLE_SIZE = 64  # CU_IPC_HANDLE_SIZE

# The simulated device's handle (shared/gpu/gpusim handle.go): magic, then
# little-endian u32 version, u32 pid, u32 fd, u32 reserved, u64 size, zeros.
SIM_MAGIC = b"ARENASIM"
SIM_VERSION = 1
SIM_MEMFD_PREFIX = "arenahost-sim-"  # the slabs' memfd names, checked through /proc
_SIM_FIELDS = struct.Struct("<8sIIIIQ")

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


# torch dtype name -> NumPy storage dtype name: NumPy has no bfloat16 or
# fp8, so those are raw bits (uint16, uint8), as arenahost.tensor maps them.
_NUMPY = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",
    "float64": "float64",
    "uint8": "uint8",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
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


@dataclass(frozen=True)
class SimHandle:
    """A simulated device slab's handle: the allocating process's memfd."""

    pid: int
    fd: int
    size: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


def is_sim_handle(handle: bytes) -> bool:
    """Whether a 64-byte IPC handle is the simulated device's (its magic), not a driver's."""
    return len(handle) == HANDLE_SIZE and bytes(handle[:8]) == SIM_MAGIC


def parse_sim_handle(handle: bytes, where: str = "") -> SimHandle:
    """Decode and check a simulated device handle; DescriptorError names the field."""
    handle = bytes(handle)
    if not is_sim_handle(handle):
        raise DescriptorError(f"{where}not a simulated-device handle (no {SIM_MAGIC!r} magic)")
    _, version, pid, fd, reserved, size = _SIM_FIELDS.unpack_from(handle)
    if version != SIM_VERSION:
        raise DescriptorError(f"{where}simulated-device handle version {version}, want {SIM_VERSION}")
    if pid == 0 or pid > 1 << 30:
        raise DescriptorError(f"{where}simulated-device handle: pid {pid}")
    if size == 0:
        raise DescriptorError(f"{where}simulated-device handle of pid {pid} fd {fd}: size 0")
    if reserved != 0:
        raise DescriptorError(f"{where}simulated-device handle of pid {pid} fd {fd}: reserved field {reserved:#x}, want 0")
    for i in range(_SIM_FIELDS.size, HANDLE_SIZE):
        if handle[i]:
            raise DescriptorError(f"{where}simulated-device handle of pid {pid} fd {fd}: byte {i} is {handle[i]:#04x}, want 0")
    return SimHandle(pid=pid, fd=fd, size=size)


def _map_sim(slab: SlabInfo) -> mmap.mmap:
    """Map a simulated slab's memfd read-write, shared, after checking it is one."""
    where = f"cuda slab {slab.id}: "
    h = parse_sim_handle(slab.handle, where)
    if h.size != slab.size:
        raise DescriptorError(f"{where}simulated-device handle says {h.size} bytes, the descriptor's size is {slab.size}")
    try:
        target = os.readlink(h.path)
    except OSError as e:
        raise DescriptorError(f"{where}{h.path}: {e.strerror} (the host exited or freed the slab)") from e
    if not target.startswith("/memfd:" + SIM_MEMFD_PREFIX):
        raise DescriptorError(f"{where}{h.path} is {target!r}, not a simulated-device slab (freed, and the descriptor reused?)")
    try:
        fd = os.open(h.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DescriptorError(f"{where}open {h.path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if st.st_size != h.size:
            raise DescriptorError(f"{where}{h.path} holds {st.st_size} bytes, the handle says {h.size}")
        try:
            return mmap.mmap(fd, h.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise DescriptorError(f"{where}mmap {h.path} ({h.size} bytes): {e.strerror}") from e
    finally:
        os.close(fd)


def _numpy_dtype(lay: "TensorLayout") -> str:
    """The NumPy storage dtype name of a layout (bfloat16 as uint16 bits, fp8 as uint8)."""
    return _NUMPY[lay.dtype]


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


def _access_rw(desc) -> bool:
    from arenahost.plugin.v1 import plugin_pb2 as pb

    return desc.access == pb.ACCESS_READ_WRITE


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

    Slabs of the simulated device (an ``ARENASIM`` handle, see the module
    doc) are mapped instead, once per (host_pid, slab id), whatever the
    backend: ``array(desc)`` gives a NumPy view and ``tensor(desc)`` a torch
    CPU tensor, both zero-copy; neither needs cupy or a GPU.
    """

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "cupy", "cudart"):
            raise ValueError(f"backend {backend!r}: want auto, cupy or cudart")
        self._backend = backend
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], tuple[int, object, SlabInfo]] = {}  # key -> (base ptr, cupy memory or None, slab)
        self._sim: dict[tuple[int, int], tuple[mmap.mmap, SlabInfo]] = {}  # simulated slabs: key -> (mapping, slab)
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

    def _sim_slab(self, slab: SlabInfo) -> mmap.mmap:
        """The mapping of a simulated slab, made on first use."""
        key = (slab.host_pid, slab.id)
        with self._lock:
            got = self._sim.get(key)
            if got is not None:
                if got[1].handle != slab.handle or got[1].size != slab.size:
                    raise DescriptorError(f"cuda slab {slab.id}: handle changed since it was opened (host restarted?)")
                return got[0]
            mm = _map_sim(slab)
            self._sim[key] = (mm, slab)
            return mm

    def _sim_bytes(self, lay: TensorLayout):
        """A writable uint8 NumPy view of a simulated slab's region."""
        import numpy as np

        mm = self._sim_slab(lay.slab)
        return np.frombuffer(mm, dtype=np.uint8, count=lay.nbytes, offset=lay.offset)

    @staticmethod
    def simulated(lay: TensorLayout) -> bool:
        """Whether a layout lies on a simulated-device slab (host memory), not a GPU."""
        return is_sim_handle(lay.slab.handle)

    def array(self, desc, writable: bool | None = None):
        """A NumPy view of a simulated-device descriptor's bytes, no copy.

        writable=None follows desc.access (ACCESS_READ_WRITE gives a writable
        view); asking for writable on a read-only descriptor is an error. A
        real device slab has no host view: use :meth:`tensor`.
        """
        rw = _access_rw(desc)
        if writable is None:
            writable = rw
        elif writable and not rw:
            raise DescriptorError(f"tensor {desc.name!r}: write access requested but descriptor is read-only")
        return self.array_at(tensor_layout(desc), writable)

    def array_at(self, lay: TensorLayout, writable: bool = False):
        """A NumPy view (dtype and shape of the layout) of a simulated slab's region, no copy."""
        if not self.simulated(lay):
            raise DescriptorError(f"cuda slab {lay.slab.id}: device memory of a real GPU has no NumPy view; use tensor()")
        a = self._sim_bytes(lay).view(_numpy_dtype(lay)).reshape(lay.shape)
        if not writable:
            a.flags.writeable = False
        return a

    def tensor(self, desc):
        """A torch tensor over the descriptor's bytes, no copy (a CPU tensor on the simulated device)."""
        return self.tensor_at(tensor_layout(desc))

    def tensor_at(self, lay: TensorLayout):
        """A torch tensor over a checked layout (see layout_of), no copy.

        On a real slab the tensor is on ``cuda:<device>``; on a simulated
        slab it is a CPU tensor (``torch.from_numpy``) over the shared pages.
        """
        import torch

        if self.simulated(lay):
            return torch.from_numpy(self._sim_bytes(lay)).view(getattr(torch, lay.dtype)).view(lay.shape)
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
            return [v[2] for v in self._open.values()] + [v[1] for v in self._sim.values()]

    def close(self) -> None:
        """Close every opened slab: only after all tensors made from it are gone.

        A simulated slab that an array or tensor still uses stays mapped
        (and cached) until a later close.
        """
        with self._lock:
            items, self._open = list(self._open.values()), {}
            for key, (mm, _) in list(self._sim.items()):
                try:
                    mm.close()
                except BufferError:
                    continue  # still exported to a live array or tensor
                del self._sim[key]
        for ptr, mem, slab in items:
            if mem is not None:
                import cupy

                with cupy.cuda.Device(slab.device):
                    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            else:
                self._rt.cudaSetDevice(slab.device)
                self._rt.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))
