"""Descriptor mapping: zero-copy views, access, bounds, bf16 helpers."""

import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper, as_float32, bf16_to_f32, f32_to_bf16, map_descriptor
from conftest import require


def test_map_is_zero_copy_both_ways(arena):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = arena.put("t", x, pb.ACCESS_READ_WRITE)
    m = Mapper()
    v = m.map(d)
    assert v.shape == (3, 4) and v.flags.writeable
    arena.mm[d.region.offset : d.region.offset + 4] = np.float32(42).tobytes()
    assert v[0, 0] == 42  # our view sees the host's write
    v[2, 3] = -7
    assert arena.read(d, np.float32)[11] == -7  # the host sees ours
    assert len(m) == 1
    m.map(arena.put("u", x, pb.ACCESS_READ_WRITE))
    assert len(m) == 1  # one mapping per (host_pid, segment, access)


def test_read_only_descriptor_maps_read_only(arena):
    d = arena.put("ro", np.ones(4, np.float32))
    v = map_descriptor(d, Mapper())
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 2
    with pytest.raises(DescriptorError, match="'ro'.*read-only"):
        Mapper().map(d, writable=True)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda d: setattr(d.region, "offset", d.region.cpu.size - 8), "exceeds segment"),
        (lambda d: setattr(d, "nbytes", 12), "nbytes 12"),
        (lambda d: setattr(d.region, "length", 8), "region length 8"),
        (lambda d: setattr(d.region.cpu, "path", "/nonexistent/seg"), "open segment"),
        (lambda d: setattr(d.region.cpu, "size", 1 << 40), "descriptor says"),
        (lambda d: setattr(d.region, "offset", d.region.offset + 2), "not aligned"),
        (lambda d: d.region.cuda.SetInParent(), "CUDA slab"),
        (lambda d: setattr(d, "dtype", 999), "no NumPy storage type"),
    ],
)
def test_bad_descriptors_are_refused_naming_the_tensor(arena, mutate, msg):
    d = arena.put("bad.t", np.ones(4, np.float32))
    mutate(d)
    with pytest.raises(DescriptorError, match=msg) as e:
        Mapper().map(d)
    assert "'bad.t'" in str(e.value)


def test_bf16_round_trip_and_rounding():
    torch = require("torch")
    x = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38, np.nan], np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16(x)
    assert np.array_equal(got[:-1], want[:-1])
    assert np.isnan(bf16_to_f32(got[-1:]))[0]
    assert np.array_equal(bf16_to_f32(got[:-1]), torch.from_numpy(want[:-1].view(np.int16)).view(torch.bfloat16).float().numpy())


def test_bf16_tensor_maps_as_uint16_bits(arena):
    x = np.array([1.5, -2.25, 3.0], np.float32)
    d = arena.put("b", f32_to_bf16(x), wire_dtype=pb.DTYPE_BF16)
    v = map_descriptor(d, Mapper())
    assert v.dtype == np.uint16
    assert np.array_equal(as_float32(v, d.dtype), x)
