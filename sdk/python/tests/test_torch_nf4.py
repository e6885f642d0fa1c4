"""arenahost.torch: bit-exact 4-bit dequantization against bitsandbytes, and ArenaNF4Linear rebinding."""

import os

import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper
from conftest import put_nf4, require, serve_fake_host
from test_nf4 import CASES, _bnb_case, _put_state

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


@pytest.mark.parametrize("shape, blocksize, nested, dtype", CASES)
def test_torch_dequantize_is_bitsandbytes_bit_for_bit(arena, shape, blocksize, nested, dtype):
    torch = require("torch")
    import arenahost.torch as at

    q, st, ref = _bnb_case(shape, blocksize, nested, dtype, seed=11)
    d = _put_state(arena, "layer.weight", q, st, dtype, nested)
    out = at.dequantize_4bit(d, Mapper())
    assert out.dtype == getattr(torch, dtype) and tuple(out.shape) == shape
    got = out.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else out.numpy()
    assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(ref).view(np.uint8))
    # A row range reads only its bytes and equals the slice of the whole.
    r0, n = shape[0] // 3, max(1, shape[0] // 2)
    part = at.dequantize_4bit(d, Mapper(), rows=(r0, n), dtype=torch.float32)
    assert torch.equal(part, out.float()[r0 : r0 + n])


def test_torch_dequantize_refuses_bad_rows(arena):
    require("torch")
    import arenahost.torch as at

    d = put_nf4(arena, "w", np.ones((8, 16), np.float32))
    with pytest.raises(DescriptorError, match=r"'w': rows \[6, 10\) outside \[0, 8\)"):
        at.dequantize_4bit(d, Mapper(), rows=(6, 4))


def test_arena_linear_rebinds_factors_on_next_forward(arena):
    torch = require("torch")
    import arenahost.torch as at
    from arenahost.host import HostClient

    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 16)).astype(np.float32)
    with serve_fake_host(arena) as (host, env):
        host.tensors["fused.weight"] = put_nf4(arena, "fused.weight", w, logical=pb.DTYPE_BF16)
        host.tensors["fused.bias"] = arena.put("fused.bias", np.arange(12, dtype=np.float32))
        client = HostClient(env["ARENAHOST_HOST_ADDR"], env["ARENAHOST_HOST_TOKEN"])
        watcher = at.FactorWatcher(client, "m")
        # rows 8..12 then 0..4 of the fused layer (a split + swapped layer)
        lin = at.ArenaNF4Linear(watcher, "fused.weight", "fused.bias", 16, 8, rows=[(8, 4), (0, 4)])
        assert watcher.poll() and not watcher.poll()  # unchanged: no new epoch
        full = at.dequantize_4bit(host.tensors["fused.weight"], Mapper(), dtype=torch.float32)
        x = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
        sel = torch.cat([full[8:12], full[0:4]])
        bias = torch.cat([torch.arange(8, 12.0), torch.arange(0, 4.0)])
        torch.testing.assert_close(lin(x), x @ sel.T + bias)

        a = rng.standard_normal((2, 16)).astype(np.float32)
        b = rng.standard_normal((12, 2)).astype(np.float32)
        host.factors["fused.weight"] = pb.LayerFactors(layer="fused.weight", a=arena.put("A", a), b=arena.put("B", b), binding_generation=1)
        torch.testing.assert_close(lin(x), x @ sel.T + bias)  # not polled yet: still the old binding
        assert watcher.poll()
        bsel = torch.from_numpy(np.concatenate([b[8:12], b[0:4]]))
        torch.testing.assert_close(lin(x), x @ sel.T + bias + (x @ torch.from_numpy(a).T) @ bsel.T)
        assert lin.binding_generation == 1
        # A binding that does not fit the layer is refused by name.
        host.factors["fused.weight"] = pb.LayerFactors(layer="fused.weight", a=arena.put("A2", a[:, :8]), b=arena.put("B2", b), binding_generation=2)
        watcher.poll()
        with pytest.raises(DescriptorError, match="'fused.weight': factors A\\[2, 8\\]"):
            lin(x)
        del host.factors["fused.weight"]
        watcher.poll()
        torch.testing.assert_close(lin(x), x @ sel.T + bias)
        # Uncached weights dequantize on every forward and give the same values.
        lin2 = at.ArenaNF4Linear(watcher, "fused.weight", "fused.bias", 16, 8, rows=[(8, 4), (0, 4)], cache_weight=False)
        watcher.poll()
        torch.testing.assert_close(lin2(x), lin(x), rtol=0, atol=0)


def test_torch_and_diffusers_modules_import_without_torch():
    """The core environment (no torch) imports the optional modules; torch loads only on use."""
    import subprocess
    from pathlib import Path

    from conftest import SDK

    core = Path(SDK.parents[1]) / ".venv" / "bin" / "python"
    if not core.exists():
        if os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1":
            pytest.fail(f"core interpreter {core} missing")
        pytest.skip(f"core interpreter {core} missing")
    script = (
        "import sys, arenahost.torch as at, arenahost.diffusers_flux as df, arenahost.diffusers_pipeline as dp\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
        "assert at.available() is False\n"
        "try:\n    at.ArenaNF4Linear\nexcept ImportError as e:\n    assert 'arenahost[torch]' in str(e), e\nelse:\n    raise SystemExit('no error')\n"
        "print('OK')\n"
    )
    r = subprocess.run([str(core), "-c", script], env=dict(os.environ, PYTHONPATH=str(SDK)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
