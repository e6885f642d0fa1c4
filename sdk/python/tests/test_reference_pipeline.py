"""The NumPy reference pipeline: real arithmetic on NF4 weights and bound factors, published latents."""

import math

import grpc
import msgpack
import numpy as np
import pytest

from arenahost.host import HostClient
from arenahost.nf4 import NF4_CODE, dequantize_4bit_arrays, quantize_nf4
from arenahost.pipelines import reference as ref
from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from arenahost.server import InvalidArgument
from arenahost.tensor import Mapper, bf16_to_f32, f32_to_bf16
from conftest import SDK, bnb_dequantize_checked, put_nf4, require

HID = 32
NAMES = ["img_in.weight", "double_blocks.0.img_attn.proj.weight", "final_layer.linear.weight"]


def build_model(host, arena, rng):
    """A tiny Flux-shaped model: img_in [H,64], one square layer, final_layer.linear [64,H], bf16 biases."""
    dense = {}
    for name, shape in zip(NAMES, [(HID, 64), (HID, HID), (64, HID)]):
        w = (rng.standard_normal(shape) / math.sqrt(shape[1])).astype(np.float32)
        d = put_nf4(arena, name, w, logical=pb.DTYPE_BF16)
        host.tensors[name] = d
        packed, absmax = quantize_nf4(w, 64)
        dense[name] = bf16_to_f32(dequantize_4bit_arrays(packed, absmax, NF4_CODE, 64, shape, "bfloat16")).astype(np.float64)
        bname = name[: -len(".weight")] + ".bias"
        b = f32_to_bf16((rng.standard_normal(shape[0]) * 0.1).astype(np.float32))
        host.tensors[bname] = arena.put(bname, b, wire_dtype=pb.DTYPE_BF16)
        dense[bname] = bf16_to_f32(b).astype(np.float64)
    # a 4-bit weight the chain must not pick (wrong shape), and a plain tensor
    host.tensors["txt_in.weight"] = put_nf4(arena, "txt_in.weight", rng.standard_normal((HID, 48)).astype(np.float32))
    host.tensors["img_in.weight.absmax"] = arena.put("img_in.weight.absmax", np.ones(4, np.float32))
    return dense


def bind(host, arena, rng, layer, rank, gen, scale=0.3):
    in_f = host.tensors[layer].quant.shape[1]
    out_f = host.tensors[layer].quant.shape[0]
    a = (rng.standard_normal((rank, in_f)) * scale).astype(np.float32)
    b = (rng.standard_normal((out_f, rank)) * scale).astype(np.float32)
    host.factors[layer] = pb.LayerFactors(layer=layer, a=arena.put(layer + ".A", a), b=arena.put(layer + ".B", b), binding_generation=gen)
    return b.astype(np.float64) @ a.astype(np.float64)


def pack_tokens(lat):
    """Flux _pack_latents by explicit indexing: token (y, x), feature c*4 + dy*2 + dx."""
    c, h, w = lat.shape
    out = np.empty(((h // 2) * (w // 2), c * 4), lat.dtype)
    for y in range(h // 2):
        for x in range(w // 2):
            for ch in range(c):
                for dy in range(2):
                    for dx in range(2):
                        out[y * (w // 2) + x, ch * 4 + dy * 2 + dx] = lat[ch, 2 * y + dy, 2 * x + dx]
    return out


def oracle(dense, deltas_per_step, steps, seed, h, w):
    """The loop in fp64 with dense weights W + B·A (deltas_per_step[i]: {layer: delta} at step i)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, h // 8, w // 8)).astype(np.float32).astype(np.float64)
    sig = np.linspace(1.0, 0.0, steps + 1)
    gelu = lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v**3)))
    for i in range(steps):
        tok = pack_tokens(x)
        hdn = tok
        for j, n in enumerate(NAMES):
            W = dense[n] + deltas_per_step[i].get(n, 0)
            hdn = hdn @ W.T + dense[n[: -len(".weight")] + ".bias"]
            if j < len(NAMES) - 1:
                hdn = gelu(hdn)
        x0 = np.tanh(hdn / (np.sqrt((hdn**2).mean(axis=1, keepdims=True)) + 1e-6))
        tok = tok + (sig[i + 1] - sig[i]) / sig[i] * (tok - x0)
        x = ref.unpatchify(tok, 16, h // 8, w // 8)
    return x


def test_patchify_is_flux_pack_order_and_invertible():
    lat = np.arange(16 * 4 * 6, dtype=np.float32).reshape(16, 4, 6)
    t = ref.patchify(lat)
    assert np.array_equal(t, pack_tokens(lat))
    assert np.array_equal(ref.unpatchify(t, 16, 4, 6), lat)


def test_choose_chain():
    def q(shape):
        return pb.TensorDescriptor(quant=pb.QuantInfo(shape=list(shape)))

    bfl = {"img_in.weight": q((8, 64)), "final_layer.linear.weight": q((64, 8)), "a.proj.weight": q((8, 8)), "b.qkv.weight": q((24, 8))}
    assert ref.choose_chain(bfl) == ["img_in.weight", "a.proj.weight", "final_layer.linear.weight"]
    forge = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    assert ref.choose_chain(forge)[0] == "model.diffusion_model.img_in.weight"
    mlp = {"m.0.weight": q((48, 12)), "m.2.weight": q((12, 48)), "big.0.weight": q((96, 24)), "big.2.weight": q((24, 96))}
    assert ref.choose_chain(mlp) == ["m.0.weight", "m.2.weight"]
    assert ref.choose_chain({"x.weight": q((5, 7)), "y.weight": q((50, 7))}) == ["x.weight"]
    with pytest.raises(ValueError):
        ref.choose_chain({"x": q((5,))})


@pytest.fixture
def client(fake_host):
    host, env = fake_host
    c = HostClient(env["ARENAHOST_HOST_ADDR"], env["ARENAHOST_HOST_TOKEN"], mapper=Mapper())
    yield host, c
    c.close()


def test_run_matches_fp64_oracle_and_follows_rebinding(client, arena):
    host, c = client
    rng = np.random.default_rng(1)
    dense = build_model(host, arena, rng)
    d1 = bind(host, arena, rng, NAMES[1], rank=4, gen=1)
    d2 = {}

    def on_publish(req):  # after step 2, the LoRA engine rebinds new factors to another layer
        if req.step == 2:
            host.factors.pop(NAMES[1])
            d2[NAMES[0]] = bind(host, arena, rng, NAMES[0], rank=2, gen=2)

    host.on_publish = on_publish
    steps, h, w = 5, 64, 48
    res = ref.run(c, ref.Params.parse({"steps": steps, "seed": 11, "width": w, "height": h, "job_id": "j1"}), state=ref._Pipeline())
    v = res.value
    assert v["layers"] == NAMES
    assert v["shape"] == [16, h // 8, w // 8] and v["steps"] == steps and len(v["step_ms"]) == steps
    assert v["factors"] == {NAMES[0]: 2, NAMES[1]: 0, NAMES[2]: 0}
    final = c.mapper.map(res.tensors[0]).copy()
    want = oracle(dense, [{NAMES[1]: d1}] * 2 + [d2] * (steps - 2), steps, 11, h, w)
    np.testing.assert_allclose(final, want, rtol=0, atol=2e-4)
    # Without the rebinding the result differs: the factors really take part.
    assert np.abs(oracle(dense, [{NAMES[1]: d1}] * steps, steps, 11, h, w) - want).max() > 1e-2

    pubs = host.published
    assert [(p.job_id, p.topic, p.step, p.total) for p in pubs] == [("j1", "latent", i + 1, steps) for i in range(steps)]
    payload = msgpack.unpackb(pubs[-1].payload)
    assert payload["arch"] == "flux1" and payload["layout"] == "chw" and payload["sigma"] == 0.0
    assert pubs[-1].tensors[0].region.offset == res.tensors[0].region.offset
    for p in pubs:
        assert list(p.tensors[0].shape) == [16, h // 8, w // 8] and p.tensors[0].dtype == pb.DTYPE_F32
    # Step latents are freed (at most `keep` live at once); the final one stays leased.
    freed = {r.offset for r in host.freed}
    assert freed == {p.tensors[0].region.offset for p in pubs[:-1]}
    assert res.tensors[0].region.offset not in freed


def test_run_is_deterministic_and_frees_previous_final(client, arena):
    host, c = client
    build_model(host, arena, np.random.default_rng(2))
    st = ref._Pipeline()
    r1 = ref.run(c, ref.Params.parse({"steps": 2, "seed": 3, "width": 32, "height": 32}), state=st)
    x1 = c.mapper.map(r1.tensors[0]).copy()
    r2 = ref.run(c, ref.Params.parse({"steps": 2, "seed": 3, "width": 32, "height": 32}), state=st)
    assert np.array_equal(x1, c.mapper.map(r2.tensors[0]))
    assert r1.tensors[0].region.offset in {r.offset for r in host.freed}


@pytest.mark.parametrize(
    "args, field",
    [({"width": 100}, "width"), ({"steps": 0}, "steps"), ({"height": "big"}, "height"), ({"layers": [1]}, "layers"), ({"keep": 0}, "keep")],
)
def test_bad_params_name_the_field(args, field):
    with pytest.raises(InvalidArgument, match=f"args.{field}"):
        ref.Params.parse(args)


def test_explicit_layers_must_chain(client, arena):
    host, c = client
    build_model(host, arena, np.random.default_rng(4))
    with pytest.raises(InvalidArgument, match="does not feed"):
        ref.run(c, ref.Params.parse({"layers": [NAMES[0], NAMES[2], NAMES[1]]}), state=ref._Pipeline())
    r = ref.run(c, ref.Params.parse({"layers": [NAMES[1]], "steps": 1, "width": 16, "height": 16}), state=ref._Pipeline())
    assert r.value["layers"] == [NAMES[1]]


def test_pipeline_plugin_process_end_to_end(start_plugin, fake_host, arena):
    host, env = fake_host
    build_model(host, arena, np.random.default_rng(5))
    p = start_plugin([str(SDK / "examples" / "reference_pipeline" / "reference_pipeline.py")], env)
    stub = pbg.PluginStub(p.channel)
    d = stub.Describe(pb.DescribeRequest(), timeout=10)
    assert d.kind == "pipeline" and "run" in [m.name for m in d.methods] and "not a trained model" in d.metadata["note"]
    resp = stub.Invoke(pb.InvokeRequest(method="run", call_id="job-7", args=msgpack.packb({"steps": 3, "seed": 1, "width": 32, "height": 32})), timeout=60)
    assert msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="warmup", args=b"\x80"), timeout=10).result) == {"ok": True}
    v = msgpack.unpackb(resp.result)
    assert v["job_id"] == "job-7" and v["layers"] == NAMES
    final = arena.read(resp.tensors[0], np.float32).reshape(16, 4, 4)
    assert np.isfinite(final).all() and abs(v["stats"]["mean"] - float(final.mean())) < 1e-6
    assert [pp.step for pp in host.published] == [1, 2, 3]
    with pytest.raises(grpc.RpcError) as e:
        stub.Invoke(pb.InvokeRequest(method="run", args=msgpack.packb({"width": 20})), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "args.width" in e.value.details()


def test_run_on_bitsandbytes_nested_weights(client, arena):
    """Weights quantized by bitsandbytes itself (nested, bf16) run through the pipeline as bnb dequantizes them."""
    torch = require("torch")
    require("bitsandbytes")
    import bitsandbytes.functional as F

    host, c = client
    g = torch.Generator().manual_seed(8)
    dense = {}
    for name, shape in zip(NAMES, [(HID, 64), (HID, HID), (64, HID)]):
        w = (torch.randn(shape, generator=g) / math.sqrt(shape[1])).to(torch.bfloat16)
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        dense[name] = bnb_dequantize_checked(q, st).float().numpy().astype(np.float64)
        d = arena.put(name, q.numpy())
        d.quant.CopyFrom(pb.QuantInfo(
            quant_type="nf4", blocksize=64, dtype=pb.DTYPE_BF16, shape=list(shape), nested=True, storage_dtype=pb.DTYPE_U8,
            absmax=arena.ref(name + ".absmax", st.absmax.numpy()), quant_map=arena.ref(name + ".quant_map", st.code.numpy()),
            nested_blocksize=st.state2.blocksize, nested_offset=float(st.offset),
            nested_absmax=arena.ref(name + ".nested_absmax", st.state2.absmax.numpy()),
            nested_quant_map=arena.ref(name + ".nested_quant_map", st.state2.code.numpy())))
        host.tensors[name] = d
        dense[name[: -len(".weight")] + ".bias"] = np.zeros(shape[0])
    res = ref.run(c, ref.Params.parse({"steps": 3, "seed": 2, "width": 32, "height": 48}), state=ref._Pipeline())
    want = oracle(dense, [{}] * 3, 3, 2, 48, 32)
    np.testing.assert_allclose(c.mapper.map(res.tensors[0]), want, rtol=0, atol=2e-4)
