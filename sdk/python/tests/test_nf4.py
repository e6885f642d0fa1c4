"""NF4 dequantization: bit-exact against bitsandbytes, through real descriptors."""

import os

import numpy as np
import pytest

from arenahost.nf4 import NF4_CODE, dequantize_4bit_arrays, dequantize_nf4, quantize_nf4, restore_nested_absmax
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError, Mapper, bf16_to_f32
from conftest import bnb_dequantize_checked, require

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bnb's CPU kernels are torch.compile'd; eager gives the same bits, faster

LOGICAL = {"bfloat16": pb.DTYPE_BF16, "float16": pb.DTYPE_F16, "float32": pb.DTYPE_F32}

CASES = [
    # shape, blocksize, nested, dtype
    ((33, 7), 64, False, "bfloat16"),  # odd n, partial last block
    ((33, 7), 64, True, "bfloat16"),
    ((64, 128), 64, True, "float16"),
    ((5, 3), 128, False, "float32"),  # fewer elements than one block
    ((300, 71), 64, True, "float32"),  # > 256 blocks: several nested blocks
    ((129, 257), 256, False, "bfloat16"),
    ((96, 96), 32, True, "bfloat16"),
]


def _bnb_case(shape, blocksize, nested, dtype, quant_type="nf4", seed=0):
    torch = require("torch")
    require("bitsandbytes")
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(getattr(torch, dtype))
    w.view(-1)[3] = 0.0
    q, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    ref = bnb_dequantize_checked(q, st)
    ref_np = ref.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else ref.numpy()
    return q, st, ref_np


def _put_state(arena, name, q, st, dtype, nested):
    d = arena.put(name, q.numpy())
    qi = pb.QuantInfo(quant_type=st.quant_type, blocksize=st.blocksize, dtype=LOGICAL[dtype], shape=list(st.shape),
                      nested=nested, storage_dtype=pb.DTYPE_U8,
                      quant_map=arena.ref(name + ".quant_map", st.code.numpy()))
    if nested:
        qi.absmax.CopyFrom(arena.ref(name + ".absmax", st.absmax.numpy()))
        qi.nested_blocksize = st.state2.blocksize
        qi.nested_offset = float(st.offset)
        qi.nested_absmax.CopyFrom(arena.ref(name + ".nested_absmax", st.state2.absmax.numpy()))
        qi.nested_quant_map.CopyFrom(arena.ref(name + ".nested_quant_map", st.state2.code.numpy()))
    else:
        qi.absmax.CopyFrom(arena.ref(name + ".absmax", st.absmax.numpy()))
    d.quant.CopyFrom(qi)
    return d


@pytest.mark.parametrize("shape, blocksize, nested, dtype", CASES)
def test_dequantize_descriptor_matches_bitsandbytes_bit_for_bit(arena, shape, blocksize, nested, dtype):
    q, st, ref = _bnb_case(shape, blocksize, nested, dtype)
    d = _put_state(arena, "layer.weight", q, st, dtype, nested)
    m = Mapper()
    out = dequantize_nf4(d, m)
    assert out.shape == shape and out.dtype == ref.dtype
    assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(ref).view(np.uint8))
    # The fp32 form is the same values, widened exactly.
    f = dequantize_nf4(d, m, dtype=np.float32)
    want = bf16_to_f32(ref) if dtype == "bfloat16" else ref.astype(np.float32)
    assert np.array_equal(f, want)


def test_nested_absmax_restore_matches_bitsandbytes():
    torch = require("torch")
    require("bitsandbytes")
    import bitsandbytes.functional as F

    q, st, _ = _bnb_case((200, 300), 64, True, "float32", seed=3)
    want = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    got = restore_nested_absmax(st.absmax.numpy(), st.state2.code.numpy(), st.state2.absmax.numpy(), st.state2.blocksize, float(st.offset))
    assert np.array_equal(got, want.numpy())


def test_fp4_uses_its_stored_code():
    require("torch")
    q, st, ref = _bnb_case((17, 9), 64, False, "float32", quant_type="fp4")
    out = dequantize_4bit_arrays(q.numpy(), st.absmax.numpy(), st.code.numpy(), 64, (17, 9), "float32")
    assert np.array_equal(out, ref)


def test_quantize_matches_bitsandbytes_codes():
    torch = require("torch")
    require("bitsandbytes")
    import bitsandbytes.functional as F

    w = torch.randn(77, 13, generator=torch.Generator().manual_seed(5))
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    packed, absmax = quantize_nf4(w.numpy(), 64)
    assert np.array_equal(absmax, st.absmax.numpy())
    assert (packed == q.numpy().reshape(-1)).mean() >= 0.999  # IEEE vs bnb reciprocal may move a code at a threshold
    assert np.array_equal(NF4_CODE, st.code.numpy())


def test_bad_quant_descriptors_are_refused_by_name(arena):
    packed, absmax = quantize_nf4(np.ones((4, 16), np.float32), 64)
    d = arena.put("w", packed)
    d.quant.CopyFrom(pb.QuantInfo(quant_type="nf4", blocksize=64, dtype=pb.DTYPE_BF16, shape=[4, 16],
                                  absmax=arena.ref("w.absmax", absmax), quant_map=arena.ref("w.qm", NF4_CODE)))
    assert dequantize_nf4(d).shape == (4, 16)
    bad = pb.TensorDescriptor()
    for mutate, msg in [
        (lambda b: b.quant.ClearField("absmax"), "absmax"),
        (lambda b: setattr(b.quant, "quant_type", "int8"), "quant_type"),
        (lambda b: setattr(b.quant, "dtype", pb.DTYPE_U8), "quant.dtype"),
        (lambda b: b.quant.shape.append(2), "packed bytes"),
        (lambda b: setattr(b.quant, "nested", True), "nested absmax dtype"),
        (lambda b: b.ClearField("quant"), "not quantized"),
    ]:
        bad.CopyFrom(d)
        mutate(bad)
        with pytest.raises(DescriptorError, match=msg) as e:
            dequantize_nf4(bad)
        assert "'w'" in str(e.value)


@pytest.mark.parametrize("shape, blocksize, nested, dtype", [((33, 7), 64, True, "bfloat16"), ((129, 257), 256, False, "float16"), ((96, 97), 32, True, "float32")])
def test_chunked_passes_match_bitsandbytes(monkeypatch, arena, shape, blocksize, nested, dtype):
    import arenahost.nf4 as nf4mod

    monkeypatch.setattr(nf4mod, "_CHUNK", 100)  # many chunks, each a whole number of blocks
    q, st, ref = _bnb_case(shape, blocksize, nested, dtype, seed=7)
    d = _put_state(arena, "chunked.weight", q, st, dtype, nested)
    out = dequantize_nf4(d, Mapper())
    assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(ref).view(np.uint8))
