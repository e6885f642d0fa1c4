"""The CUDA descriptor path on the simulated device (shared/gpu/gpusim): a
CUDASlab whose 64-byte handle is b"ARENASIM" | u32 version | u32 pid | u32 fd
| u32 reserved | u64 size | zeros names a memfd that CudaMapper maps through
/proc/<pid>/fd/<fd>, zero-copy, both ways, in this process and in another."""

import mmap
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from arenahost.cuda import SIM_MAGIC, CudaMapper, is_sim_handle, parse_sim_handle, tensor_layout
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, bf16_to_f32, f32_to_bf16
from conftest import require

SIZE = 1 << 16


def sim_handle(pid, fd, size, version=1, reserved=0, magic=SIM_MAGIC, tail=b""):
    h = struct.pack("<8sIIIIQ", magic, version, pid, fd, reserved, size) + tail
    return h + bytes(64 - len(h))


class SimSlab:
    """A slab as the simulated device allocates it: a named memfd, mapped here."""

    def __init__(self, slab_id=5, size=SIZE, name="arenahost-sim-7"):
        self.fd = os.memfd_create(name, 0)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.id, self.size = slab_id, size
        self.handle = sim_handle(os.getpid(), self.fd, size)

    def desc(self, name, dtype, shape, offset, access=pb.ACCESS_READ_ONLY, handle=None, size=None):
        item = {pb.DTYPE_F32: 4, pb.DTYPE_BF16: 2, pb.DTYPE_F16: 2, pb.DTYPE_U8: 1, pb.DTYPE_I64: 8}[dtype]
        n = item * int(np.prod(shape, dtype=np.int64))
        slab = pb.CUDASlab(id=self.id, ipc_handle=self.handle if handle is None else handle,
                           size=self.size if size is None else size, device=0, host_pid=os.getpid())
        return pb.TensorDescriptor(name=name, dtype=dtype, shape=list(shape), nbytes=n, access=access,
                                   region=pb.Region(cuda=slab, offset=offset, length=n, generation=1))

    def close(self):
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def slab():
    s = SimSlab()
    yield s
    s.close()


def test_sim_handle_parse():
    h = sim_handle(1234, 17, 1 << 20)
    assert is_sim_handle(h) and not is_sim_handle(bytes(range(64)))
    got = parse_sim_handle(h)
    assert (got.pid, got.fd, got.size, got.path) == (1234, 17, 1 << 20, "/proc/1234/fd/17")


@pytest.mark.parametrize(
    "handle,msg",
    [
        (sim_handle(1, 3, 64, version=2), "version 2, want 1"),
        (sim_handle(0, 3, 64), "pid 0"),
        (sim_handle(1, 3, 0), "size 0"),
        (sim_handle(1, 3, 64, reserved=9), "reserved field 0x9"),
        (sim_handle(1, 3, 64, tail=b"\0\0\x07"), "byte 34 is 0x07"),
        (bytes(range(64)), "no b'ARENASIM' magic"),
    ],
)
def test_sim_handle_bad(handle, msg):
    with pytest.raises(DescriptorError, match=msg):
        parse_sim_handle(handle)


def test_sim_read_zero_copy(slab):
    want = np.arange(24, dtype=np.float32).reshape(4, 6) * 0.5
    slab.mm[256:256 + want.nbytes] = want.tobytes()
    m = CudaMapper()
    d = slab.desc("w", pb.DTYPE_F32, (4, 6), 256)
    assert CudaMapper.simulated(tensor_layout(d))
    a = m.array(d)
    assert a.dtype == np.float32 and a.shape == (4, 6) and not a.flags.writeable
    np.testing.assert_array_equal(a, want)
    slab.mm[256:260] = np.float32(42.0).tobytes()  # the host writes: the view sees it (no copy)
    assert a[0, 0] == 42.0
    # bf16 maps as its raw bits, as arenahost.tensor does.
    bits = f32_to_bf16(np.array([1.5, -3.0, 0.25], np.float32))
    slab.mm[1024:1030] = bits.tobytes()
    b = m.array(slab.desc("b", pb.DTYPE_BF16, (3,), 1024))
    assert b.dtype == np.uint16 and bf16_to_f32(b).tolist() == [1.5, -3.0, 0.25]
    assert len(m.opened()) == 1  # one mapping for the slab, both descriptors
    del a, b
    m.close()
    assert list(m.opened()) == []


def test_sim_write(slab):
    m = CudaMapper()
    d = slab.desc("out", pb.DTYPE_I64, (2, 3), 4096, access=pb.ACCESS_READ_WRITE)
    a = m.array(d)
    assert a.flags.writeable
    a[...] = np.arange(6, dtype=np.int64).reshape(2, 3) * -7
    got = np.frombuffer(slab.mm, dtype=np.int64, count=6, offset=4096).copy()
    assert got.tolist() == [0, -7, -14, -21, -28, -35]
    with pytest.raises(DescriptorError, match="write access requested but descriptor is read-only"):
        m.array(slab.desc("ro", pb.DTYPE_F32, (4,), 0), writable=True)
    ro = m.array(d, writable=False)
    with pytest.raises(ValueError):
        ro[0, 0] = 1


def test_sim_other_process(slab):
    """A plugin process maps the slab through /proc and reads and writes it."""
    slab.mm[0:16] = np.array([1, 2, 3, 4], np.float32).tobytes()
    src = slab.desc("src", pb.DTYPE_F32, (4,), 0)
    dst = slab.desc("dst", pb.DTYPE_F16, (4,), 512, access=pb.ACCESS_READ_WRITE)
    code = (
        "import sys\n"
        "from arenahost.cuda import CudaMapper\n"
        "from arenahost.plugin.v1 import plugin_pb2 as pb\n"
        "src, dst = (pb.TensorDescriptor.FromString(bytes.fromhex(a)) for a in sys.argv[1:3])\n"
        "m = CudaMapper()\n"
        "m.array(dst)[:] = m.array(src) * 2 + 0.5\n"
        "print(len(m.opened()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, src.SerializeToString().hex(), dst.SerializeToString().hex()],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
    assert np.frombuffer(slab.mm, dtype=np.float16, count=4, offset=512).tolist() == [2.5, 4.5, 6.5, 8.5]


def test_sim_torch_cpu_tensor(slab):
    torch = require("torch")
    m = CudaMapper()
    bits = f32_to_bf16(np.array([1.5, -3.0, 0.25, 8.0], np.float32))
    slab.mm[2048:2056] = bits.tobytes()
    t = m.tensor(slab.desc("b", pb.DTYPE_BF16, (2, 2), 2048, access=pb.ACCESS_READ_WRITE))
    assert t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.shape == (2, 2)
    assert t.float().flatten().tolist() == [1.5, -3.0, 0.25, 8.0]
    t.mul_(2)  # torch writes land in the shared pages
    assert bf16_to_f32(np.frombuffer(slab.mm, dtype=np.uint16, count=4, offset=2048)).tolist() == [3.0, -6.0, 0.5, 16.0]
    f = m.tensor(slab.desc("f", pb.DTYPE_F32, (3,), 4096))
    slab.mm[4096:4108] = np.array([7, 8, 9], np.float32).tobytes()  # and host writes are seen
    assert f.dtype == torch.float32 and f.tolist() == [7.0, 8.0, 9.0]
    assert len(m.opened()) == 1


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(size=SIZE // 2), "handle says 65536 bytes, the descriptor's size is 32768"),
        (dict(handle=sim_handle(os.getpid(), 1 << 20, SIZE)), "No such file"),
    ],
)
def test_sim_bad_descriptor(slab, kw, msg):
    d = slab.desc("w", pb.DTYPE_F32, (4,), 0, **kw)
    with pytest.raises(DescriptorError, match=msg):
        CudaMapper().array(d)


def test_sim_refuses_other_memfd():
    s = SimSlab(name="not-a-slab")
    try:
        with pytest.raises(DescriptorError, match="not a simulated-device slab"):
            CudaMapper().array(s.desc("w", pb.DTYPE_F32, (4,), 0))
    finally:
        s.close()


def test_sim_refuses_resized_memfd(slab):
    os.ftruncate(slab.fd, SIZE * 2)
    with pytest.raises(DescriptorError, match="holds 131072 bytes, the handle says 65536"):
        CudaMapper().array(slab.desc("w", pb.DTYPE_F32, (4,), 0))


def test_sim_handle_change_refused(slab):
    m = CudaMapper()
    m.array(slab.desc("w", pb.DTYPE_F32, (4,), 0))
    other = SimSlab(slab_id=slab.id)  # same slab id and host, another memfd: a restarted host
    try:
        with pytest.raises(DescriptorError, match="handle changed"):
            m.array(other.desc("w", pb.DTYPE_F32, (4,), 0))
    finally:
        other.close()


def test_real_handle_has_no_numpy_view():
    region = pb.Region(cuda=pb.CUDASlab(id=1, ipc_handle=bytes(range(64)), size=4096, device=0, host_pid=1), offset=0, length=16)
    d = pb.TensorDescriptor(name="w", dtype=pb.DTYPE_F32, shape=[4], nbytes=16, region=region)
    with pytest.raises(DescriptorError, match="real GPU has no NumPy view"):
        CudaMapper().array(d)


def test_numpy_mapper_maps_sim_slabs(slab):
    """arenahost.tensor's Mapper (what plugins and pipelines use for every
    descriptor) maps simulated-device slabs like CPU segments, so a Python
    pipeline runs unchanged on a host whose arena is cuda-sim; a real GPU's
    slab is refused with a pointer to CudaMapper."""
    from arenahost.tensor import Mapper

    m = Mapper()
    src = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    slab.mm[512:512 + src.nbytes] = src.tobytes()
    a = m.map(slab.desc("w", pb.DTYPE_F32, (3, 4), 512))
    assert not a.flags.writeable
    np.testing.assert_array_equal(a, src)
    out = m.map(slab.desc("out", pb.DTYPE_F32, (2, 2), 8192, access=pb.ACCESS_READ_WRITE))
    out[...] = [[1, 2], [3, 4]]
    assert np.frombuffer(slab.mm, np.float32, 4, 8192).tolist() == [1, 2, 3, 4]
    with pytest.raises(DescriptorError, match="exceeds|past the slab"):
        m.map(slab.desc("far", pb.DTYPE_F32, (4,), SIZE - 8))
    region = pb.Region(cuda=pb.CUDASlab(id=1, ipc_handle=bytes(range(64)), size=4096, device=0, host_pid=1), offset=0, length=16)
    with pytest.raises(DescriptorError, match="GPU's CUDA slab.*CudaMapper"):
        m.map(pb.TensorDescriptor(name="g", dtype=pb.DTYPE_F32, shape=[4], nbytes=16, region=region))
    del a, out
    m.close()
    assert len(m) == 0
