"""CUDA descriptor decoding without a GPU: slab checks, dtype and stride math,
and that importing arenahost.cuda pulls in neither torch nor cupy."""

import subprocess
import sys

import pytest

from arenahost.cuda import HANDLE_SIZE, CudaMapper, slab_info, tensor_layout, torch_dtype
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError

HANDLE = bytes(range(64))


def desc(dtype=pb.DTYPE_BF16, shape=(3, 5), offset=512, length=None, size=1 << 20, handle=HANDLE, device=1, host_pid=4242, nbytes=None):
    item = torch_dtype(dtype)[1]
    n = item
    for d in shape:
        n *= d
    region = pb.Region(cuda=pb.CUDASlab(id=7, ipc_handle=handle, size=size, device=device, host_pid=host_pid),
                       offset=offset, length=n if length is None else length, generation=9)
    return pb.TensorDescriptor(name="w", dtype=dtype, shape=list(shape), nbytes=n if nbytes is None else nbytes, region=region)


def test_layout_bf16():
    lay = tensor_layout(desc())
    assert lay.slab.id == 7 and lay.slab.handle == HANDLE and lay.slab.device == 1 and lay.slab.host_pid == 4242
    assert (lay.offset, lay.nbytes, lay.dtype, lay.itemsize) == (512, 30, "bfloat16", 2)
    assert lay.shape == (3, 5) and lay.strides == (5, 1)


@pytest.mark.parametrize(
    "dtype,shape,strides",
    [
        (pb.DTYPE_F32, (2, 3, 4), (12, 4, 1)),
        (pb.DTYPE_U8, (7,), (1,)),
        (pb.DTYPE_F16, (), ()),
        (pb.DTYPE_I64, (4, 0, 2), (2, 2, 1)),
    ],
)
def test_strides(dtype, shape, strides):
    assert tensor_layout(desc(dtype=dtype, shape=shape)).strides == strides


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(handle=b"\x01" * 63), "ipc_handle has 63 bytes, want 64"),
        (dict(size=0), "size 0"),
        (dict(device=-1), "device -1"),
        (dict(host_pid=0), "host_pid 0"),
        (dict(offset=1 << 20), "past the slab's 1048576 bytes"),
        (dict(offset=513), "not aligned"),
        (dict(nbytes=31), "nbytes says 31"),
        (dict(length=10), "in a region of 10"),
    ],
)
def test_bad_descriptors(kw, msg):
    with pytest.raises(DescriptorError, match=msg):
        tensor_layout(desc(**kw))


def test_cpu_region_refused():
    r = pb.Region(cpu=pb.CPUSegment(id=1, path="/dev/shm/x", size=4096, host_pid=1), offset=0, length=4)
    with pytest.raises(DescriptorError, match="not on a CUDA slab"):
        slab_info(r, "x")


def test_unknown_dtype():
    with pytest.raises(DescriptorError, match="no torch equivalent"):
        torch_dtype(12345)


def test_import_is_lazy():
    code = "import sys, arenahost.cuda; m = arenahost.cuda.CudaMapper(); print('torch' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_mapper_starts_empty():
    assert list(CudaMapper().opened()) == [] and HANDLE_SIZE == 64


def test_layout_of_without_protobuf_objects():
    from arenahost.cuda import SlabInfo, layout_of

    slab = SlabInfo(id=3, handle=HANDLE, size=4096, device=0, host_pid=99)
    lay = layout_of(slab, 256, 512, "DTYPE_F32", [4, 8], 128)
    assert (lay.dtype, lay.shape, lay.strides, lay.offset) == ("float32", (4, 8), (8, 1), 256)
    with pytest.raises(DescriptorError, match="past the slab's 4096 bytes"):
        layout_of(slab, 4000, 512, "DTYPE_F32", [4, 8], 128)


def test_cuda_array_interface_object():
    from arenahost.cuda import _CudaArray

    owner = object()
    a = _CudaArray(0x7F0000001000, 4096, owner)
    cai = a.__cuda_array_interface__
    assert cai["data"] == (0x7F0000001000, False) and cai["shape"] == (4096,) and cai["typestr"] == "|u1" and cai["version"] == 3


def test_mapper_backend_checked():
    with pytest.raises(ValueError, match="backend"):
        CudaMapper(backend="opencl")
