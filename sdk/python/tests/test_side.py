"""Side-mode forward: y = x·Wᵀ + (x·A_catᵀ)·B_catᵀ + bias against a dense fp64 oracle."""

import numpy as np
import pytest

from arenahost.nf4 import dequantize_nf4
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.side import ArenaLinear, linear_forward
from arenahost.tensor import Mapper, f32_to_bf16
from conftest import put_nf4


def _oracle(x, w, bias, pairs):
    wref = w.astype(np.float64) + sum(b.astype(np.float64) @ a.astype(np.float64) for a, b in pairs)
    return x.astype(np.float64) @ wref.T + bias.astype(np.float64)


@pytest.mark.parametrize("ranks", [[], [4], [8, 16, 1]])
def test_linear_forward_matches_fp64_oracle(ranks):
    rng = np.random.default_rng(len(ranks))
    out_f, in_f = 96, 80
    x = rng.standard_normal((5, 7, in_f)).astype(np.float32)
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    pairs = [(rng.standard_normal((r, in_f)).astype(np.float32) * 0.1, rng.standard_normal((out_f, r)).astype(np.float32) * 0.1) for r in ranks]
    want = _oracle(x, w, bias, pairs)
    # Concatenated factors (what the LoRA engine publishes) and separate pairs agree.
    cat = None
    if pairs:
        cat = (np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs], axis=1))
    for factors in (pairs or None, cat):
        y = linear_forward(x, w, bias, factors)
        assert y.dtype == np.float32 and y.shape == (5, 7, out_f)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    y64 = linear_forward(x.astype(np.float64), w, bias, pairs)
    np.testing.assert_allclose(y64, want, rtol=1e-12, atol=1e-12)


def test_linear_forward_shape_errors():
    w = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="3 features|weight expects 3"):
        linear_forward(np.zeros((2, 5)), w)
    with pytest.raises(ValueError, match=r"factors\[0\]"):
        linear_forward(np.zeros((2, 3)), w, None, (np.zeros((2, 3)), np.zeros((5, 2))))
    with pytest.raises(ValueError, match="bias shape"):
        linear_forward(np.zeros((2, 3)), w, np.zeros(3))


def test_arena_linear_uses_rebound_factors_without_reload(arena):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float32)
    wd = put_nf4(arena, "blk.proj.weight", w, logical=pb.DTYPE_BF16)
    bias = arena.put("blk.proj.bias", f32_to_bf16(rng.standard_normal(48).astype(np.float32)), wire_dtype=pb.DTYPE_BF16)
    m = Mapper()
    lin = ArenaLinear(wd, bias, m)
    wdq = dequantize_nf4(wd, m, dtype=np.float32)
    x = rng.standard_normal((10, 64)).astype(np.float32)
    base = lin(x)
    np.testing.assert_allclose(base, _oracle(x, wdq, lin.bias, []), rtol=1e-5, atol=1e-5)

    a = arena.put("f.a", (rng.standard_normal((6, 64)) * 0.1).astype(np.float32))
    b_bits = f32_to_bf16((rng.standard_normal((48, 6)) * 0.1).astype(np.float32))
    b = arena.put("f.b", b_bits, wire_dtype=pb.DTYPE_BF16)  # bf16 B is widened exactly
    lf = pb.LayerFactors(layer=wd.name, a=a, b=b, binding_generation=1)
    assert lin.bind(lf) and not lin.bind(lf)  # same generation: nothing to do
    f = lin.factors
    np.testing.assert_allclose(lin(x), _oracle(x, wdq, lin.bias, [(f.a, f.b)]), rtol=1e-4, atol=1e-4)
    # The host rewrites B in place (a strength change) and bumps the generation.
    arena.mm[b.region.offset : b.region.offset + b.region.length] = f32_to_bf16(np.zeros((48, 6), np.float32)).tobytes()
    lf.binding_generation = 2
    assert lin.bind(lf)
    np.testing.assert_allclose(lin(x), base, rtol=1e-6, atol=1e-6)
    assert lin.bind(None) and lin.factors is None
