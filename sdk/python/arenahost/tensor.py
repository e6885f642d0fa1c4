"""Zero-copy mapping of arena tensor descriptors to NumPy arrays.

A TensorDescriptor names a region of a shared-memory segment (a memfd reached
through /proc/HOSTPID/fd/N, or a /dev/shm file). :func:`map_descriptor` opens
the segment once per (host_pid, segment id, access), mmaps it MAP_SHARED and
returns an ndarray *view* over the region: reads see the host's bytes and
writes (read-write descriptors only) are visible to the host at once.

NumPy has no bfloat16: BF16 tensors map as ``uint16`` holding the raw bf16
bits; :func:`bf16_to_f32` and :func:`f32_to_bf16` convert (round to nearest
even, as torch and bitsandbytes do). F8 types map as ``uint8``.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from typing import Iterable, Sequence

import numpy as np

from arenahost.plugin.v1 import plugin_pb2 as pb

__all__ = [
    "DescriptorError",
    "Mapper",
    "default_mapper",
    "map_descriptor",
    "map_ref",
    "map_region_bytes",
    "as_float32",
    "bf16_to_f32",
    "f32_to_bf16",
    "numpy_dtype",
    "dtype_enum",
    "itemsize",
    "dtype_name",
    "make_descriptor",
]


class DescriptorError(ValueError):
    """A descriptor that cannot be mapped: names the tensor and the field."""


# Storage dtype of each wire DType as NumPy sees it.
_NP = {
    pb.DTYPE_F32: np.dtype(np.float32),
    pb.DTYPE_F16: np.dtype(np.float16),
    pb.DTYPE_BF16: np.dtype(np.uint16),  # raw bf16 bits
    pb.DTYPE_U8: np.dtype(np.uint8),
    pb.DTYPE_I8: np.dtype(np.int8),
    pb.DTYPE_I16: np.dtype(np.int16),
    pb.DTYPE_I32: np.dtype(np.int32),
    pb.DTYPE_I64: np.dtype(np.int64),
    pb.DTYPE_F8_E4M3: np.dtype(np.uint8),  # raw fp8 bits
    pb.DTYPE_F8_E5M2: np.dtype(np.uint8),  # raw fp8 bits
    pb.DTYPE_BOOL: np.dtype(np.bool_),
    pb.DTYPE_F64: np.dtype(np.float64),
    pb.DTYPE_U16: np.dtype(np.uint16),
    pb.DTYPE_U32: np.dtype(np.uint32),
    pb.DTYPE_U64: np.dtype(np.uint64),
}

# NumPy dtype -> wire DType for arrays a plugin describes (uint16 means U16;
# pass dtype=DTYPE_BF16 explicitly for bf16 bits).
_ENUM = {
    np.dtype(np.float32): pb.DTYPE_F32,
    np.dtype(np.float16): pb.DTYPE_F16,
    np.dtype(np.float64): pb.DTYPE_F64,
    np.dtype(np.uint8): pb.DTYPE_U8,
    np.dtype(np.int8): pb.DTYPE_I8,
    np.dtype(np.int16): pb.DTYPE_I16,
    np.dtype(np.int32): pb.DTYPE_I32,
    np.dtype(np.int64): pb.DTYPE_I64,
    np.dtype(np.bool_): pb.DTYPE_BOOL,
    np.dtype(np.uint16): pb.DTYPE_U16,
    np.dtype(np.uint32): pb.DTYPE_U32,
    np.dtype(np.uint64): pb.DTYPE_U64,
}


def dtype_name(dtype: int) -> str:
    """Wire DType enum value as its proto name (DTYPE_F32), or the number."""
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return str(dtype)


def numpy_dtype(dtype: int) -> np.dtype:
    """The NumPy storage dtype of a wire DType (BF16 -> uint16 bits)."""
    try:
        return _NP[dtype]
    except KeyError:
        raise DescriptorError(f"dtype {dtype_name(dtype)} has no NumPy storage type") from None


def itemsize(dtype: int) -> int:
    """Bytes per element of a wire DType."""
    return numpy_dtype(dtype).itemsize


def dtype_enum(dtype) -> int:
    """The wire DType of a NumPy dtype (float32 -> DTYPE_F32)."""
    d = np.dtype(dtype)
    try:
        return _ENUM[d]
    except KeyError:
        raise DescriptorError(f"NumPy dtype {d} has no arenahost DType") from None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32, exactly."""
    b = np.asarray(bits)
    if b.dtype != np.uint16:
        raise TypeError(f"bf16_to_f32: want uint16 bf16 bits, got {b.dtype}")
    return (b.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest, ties to even; NaN stays NaN) as uint16 bits."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    u = a.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def as_float32(arr: np.ndarray, dtype: int) -> np.ndarray:
    """A float32 view or copy of a mapped array whose wire dtype is `dtype`.

    F32 arrays are returned as they are (no copy); BF16 bits are widened
    exactly; other numeric types are converted with astype.
    """
    if dtype == pb.DTYPE_F32:
        return arr
    if dtype == pb.DTYPE_BF16:
        return bf16_to_f32(arr)
    if dtype in (pb.DTYPE_F8_E4M3, pb.DTYPE_F8_E5M2):
        raise DescriptorError(f"as_float32: {dtype_name(dtype)} is not supported")
    return arr.astype(np.float32)


class _Segment:
    __slots__ = ("mm", "size", "path")

    def __init__(self, mm: mmap.mmap, size: int, path: str):
        self.mm = mm
        self.size = size
        self.path = path


class Mapper:
    """Maps CPU segments once and hands out ndarray views over regions.

    Mappings are cached per (host_pid, segment id, path, writable): the
    segment ids a host hands out are stable for the life of that host process. Arrays
    returned keep their mapping alive; :meth:`close` unmaps what no array
    still uses.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segs: dict[tuple[int, int, str, bool], _Segment] = {}
        self._sims: dict[tuple[int, int, bytes], mmap.mmap] = {}

    def _segment(self, name: str, seg: pb.CPUSegment, writable: bool) -> _Segment:
        key = (seg.host_pid, seg.id, seg.path, writable)
        with self._lock:
            s = self._segs.get(key)
            if s is not None:
                return s
            if not seg.path:
                raise DescriptorError(f"tensor {name!r}: region.cpu.path is empty")
            if seg.size == 0:
                raise DescriptorError(f"tensor {name!r}: region.cpu.size is 0")
            flags = os.O_RDWR if writable else os.O_RDONLY
            try:
                fd = os.open(seg.path, flags | os.O_CLOEXEC)
            except OSError as e:
                raise DescriptorError(
                    f"tensor {name!r}: open segment {seg.id} at {seg.path}: {e.strerror}"
                ) from e
            try:
                st = os.fstat(fd)
                if st.st_size < seg.size:
                    raise DescriptorError(
                        f"tensor {name!r}: segment {seg.id} at {seg.path} is {st.st_size} bytes, "
                        f"descriptor says {seg.size}"
                    )
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
                mm = mmap.mmap(fd, seg.size, flags=mmap.MAP_SHARED, prot=prot)
            finally:
                os.close(fd)
            s = _Segment(mm, seg.size, seg.path)
            self._segs[key] = s
            return s

    def _sim_slab(self, name: str, region: pb.Region) -> mmap.mmap:
        """The mapping of a simulated-device slab (host memory behind the
        device API: arena backend cuda-sim), made once per slab."""
        from . import cuda  # lazily: cuda imports this module

        slab = cuda.slab_info(region, name)
        key = (slab.host_pid, slab.id, slab.handle)
        with self._lock:
            got = self._sims.get(key)
            if got is None:
                got = cuda._map_sim(slab)
                self._sims[key] = got
            return got

    def region_bytes(self, name: str, region: pb.Region, writable: bool) -> tuple[mmap.mmap, int, int]:
        """(mapping, offset, length) of a region after checking its bounds.

        CPU segments, and the simulated device's slabs (their memory is host
        shared memory) map; a real GPU's slab has no host view: open it with
        :class:`arenahost.cuda.CudaMapper`.
        """
        if region is not None and region.HasField("cuda"):
            from . import cuda

            if not cuda.is_sim_handle(bytes(region.cuda.ipc_handle)):
                raise DescriptorError(
                    f"tensor {name!r}: region is on a GPU's CUDA slab; the NumPy mapper maps host memory only "
                    "(use arenahost.cuda.CudaMapper for a torch tensor on the device)"
                )
            return self._sim_slab(name, region), region.offset, region.length
        if region is None or not region.HasField("cpu"):
            raise DescriptorError(f"tensor {name!r}: region has no cpu segment")
        s = self._segment(name, region.cpu, writable)
        end = region.offset + region.length
        if end > s.size:
            raise DescriptorError(
                f"tensor {name!r}: region [{region.offset}, {end}) exceeds segment {region.cpu.id} "
                f"of {s.size} bytes"
            )
        return s.mm, region.offset, region.length

    def map(self, desc: pb.TensorDescriptor, writable: bool | None = None) -> np.ndarray:
        """ndarray view of a descriptor's storage (dtype and shape as described).

        writable=None follows desc.access; asking for writable on a read-only
        descriptor is an error.
        """
        access_rw = desc.access == pb.ACCESS_READ_WRITE
        if writable is None:
            writable = access_rw
        elif writable and not access_rw:
            raise DescriptorError(f"tensor {desc.name!r}: write access requested but descriptor is read-only")
        return self._view(desc.name, desc.dtype, list(desc.shape), desc.nbytes, desc.region, writable)

    def map_ref(self, name: str, ref: pb.TensorRef) -> np.ndarray:
        """Read-only ndarray view of a quantization side tensor (absmax, quant_map…)."""
        try:
            nbytes = math.prod(ref.shape) * itemsize(ref.dtype)
        except DescriptorError as e:
            raise DescriptorError(f"tensor {name!r}: {e}") from None
        return self._view(name, ref.dtype, list(ref.shape), nbytes, ref.region, False)

    def _view(self, name: str, dtype: int, shape: Sequence[int], nbytes: int, region: pb.Region, writable: bool) -> np.ndarray:
        try:
            npd = numpy_dtype(dtype)
        except DescriptorError as e:
            raise DescriptorError(f"tensor {name!r}: {e}") from None
        for i, d in enumerate(shape):
            if d < 0:
                raise DescriptorError(f"tensor {name!r}: shape[{i}] = {d} is negative")
        count = math.prod(shape) if shape else 1
        want = count * npd.itemsize
        if nbytes and nbytes != want:
            raise DescriptorError(
                f"tensor {name!r}: nbytes {nbytes} but {dtype_name(dtype)}{list(shape)} needs {want}"
            )
        if region.length < want:
            raise DescriptorError(f"tensor {name!r}: region length {region.length} < {want} bytes of data")
        mm, off, _ = self.region_bytes(name, region, writable)
        if off % npd.itemsize:
            raise DescriptorError(f"tensor {name!r}: region offset {off} not aligned to {npd.itemsize}")
        arr = np.frombuffer(mm, dtype=npd, count=count, offset=off).reshape(shape)
        if not writable:
            arr.flags.writeable = False
        return arr

    def bytes(self, name: str, region: pb.Region, length: int | None = None) -> np.ndarray:
        """Read-only uint8 view of a region (or its first `length` bytes)."""
        mm, off, rlen = self.region_bytes(name, region, False)
        n = rlen if length is None else length
        if n > rlen:
            raise DescriptorError(f"tensor {name!r}: want {n} bytes but region length is {rlen}")
        arr = np.frombuffer(mm, dtype=np.uint8, count=n, offset=off)
        arr.flags.writeable = False
        return arr

    def close(self) -> None:
        """Unmap every segment that no array references any more."""
        with self._lock:
            for key, s in list(self._segs.items()):
                try:
                    s.mm.close()
                except BufferError:
                    continue  # still exported to a live array
                del self._segs[key]
            for key, mm in list(self._sims.items()):
                try:
                    mm.close()
                except BufferError:
                    continue
                del self._sims[key]

    def __len__(self) -> int:
        return len(self._segs) + len(self._sims)


_default = Mapper()


def default_mapper() -> Mapper:
    """The process-wide mapper map_descriptor uses when none is given."""
    return _default


def map_descriptor(desc: pb.TensorDescriptor, mapper: Mapper | None = None, writable: bool | None = None) -> np.ndarray:
    """Zero-copy ndarray over a CPU descriptor (read-only unless ACCESS_READ_WRITE)."""
    return (mapper if mapper is not None else _default).map(desc, writable)


def map_ref(name: str, ref: pb.TensorRef, mapper: Mapper | None = None) -> np.ndarray:
    """Zero-copy read-only ndarray over a TensorRef."""
    return (mapper if mapper is not None else _default).map_ref(name, ref)


def map_region_bytes(name: str, region: pb.Region, length: int | None = None, mapper: Mapper | None = None) -> np.ndarray:
    """Zero-copy read-only uint8 view of a region."""
    return (mapper if mapper is not None else _default).bytes(name, region, length)


def make_descriptor(
    name: str,
    dtype: int,
    shape: Iterable[int],
    *,
    segment_id: int,
    path: str,
    segment_size: int,
    offset: int = 0,
    access: int = pb.ACCESS_READ_ONLY,
    generation: int = 0,
    host_pid: int | None = None,
    model: str = "",
) -> pb.TensorDescriptor:
    """Build a CPU TensorDescriptor (tests, and plugins describing regions they own)."""
    shape = [int(d) for d in shape]
    nbytes = (math.prod(shape) if shape else 1) * itemsize(dtype)
    return pb.TensorDescriptor(
        name=name,
        dtype=dtype,
        shape=shape,
        nbytes=nbytes,
        access=access,
        model=model,
        region=pb.Region(
            cpu=pb.CPUSegment(id=segment_id, path=path, size=segment_size, host_pid=os.getpid() if host_pid is None else host_pid),
            offset=offset,
            length=nbytes,
            generation=generation,
        ),
    )
