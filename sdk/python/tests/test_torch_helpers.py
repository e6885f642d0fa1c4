"""Optional torch helpers: zero-copy tensors, bit-exact dequantization, side forward."""

import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.side import linear_forward as np_forward
from arenahost.tensor import Mapper, f32_to_bf16
from conftest import put_nf4, require


def test_as_tensor_is_zero_copy(arena):
    torch = require("torch")
    import arenahost.torch as at

    assert at.available()
    d = arena.put("t", np.arange(6, dtype=np.float32).reshape(2, 3), pb.ACCESS_READ_WRITE)
    t = at.as_tensor(d, Mapper())
    assert t.shape == (2, 3) and t.dtype == torch.float32
    t.mul_(2)  # torch writes land in the shared segment
    np.testing.assert_array_equal(arena.read(d, np.float32), np.arange(6, dtype=np.float32) * 2)
    bits = f32_to_bf16(np.array([1.5, -3.0], np.float32))
    b = at.as_tensor(arena.put("b", bits, wire_dtype=pb.DTYPE_BF16), Mapper())
    assert b.dtype == torch.bfloat16 and b.float().tolist() == [1.5, -3.0]


def test_dequantize_and_forward_match_numpy(arena):
    torch = require("torch")
    import arenahost.torch as at

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    d = put_nf4(arena, "w", w, logical=pb.DTYPE_BF16)
    tw = at.dequantize_nf4(d, Mapper())
    assert tw.dtype == torch.bfloat16 and tw.shape == (24, 40)
    from arenahost.nf4 import dequantize_nf4

    wn = dequantize_nf4(d, Mapper(), dtype=np.float32)
    assert np.array_equal(tw.float().numpy(), wn)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    a, b = rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal((24, 3)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    got = at.linear_forward(torch.from_numpy(x), torch.from_numpy(wn), torch.from_numpy(bias), (torch.from_numpy(a), torch.from_numpy(b)))
    np.testing.assert_allclose(got.numpy(), np_forward(x, wn, bias, (a, b)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="factors"):
        at.linear_forward(torch.from_numpy(x), torch.from_numpy(wn), None, [(torch.from_numpy(b), torch.from_numpy(a))])
