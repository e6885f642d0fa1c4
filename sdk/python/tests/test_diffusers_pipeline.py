"""The diffusers-flux pipeline plugin, as a real plugin process over gRPC.

The host is the SDK tests' fake Host service (memfd arena, real gRPC) holding
the NF4 sample model written by ``bin/arenahost sample``. A run publishes
one packed-latent preview per step; each decodes (unpack + the pipeline's
VAE) to an image of the requested size, and the last one decodes to the PNG
the plugin returns.
"""

import io
import os

import grpc
import msgpack
import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from conftest import SDK, Arena, require, serve_fake_host
from test_diffusers_side import write_sample

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
PLUGIN = SDK / "examples" / "diffusers_flux" / "diffusers_flux.py"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    require("torch")
    require("diffusers")
    require("bitsandbytes")
    from arenahost import diffusers_check as dc

    ckpt = write_sample(tmp_path_factory.mktemp("pipe"))
    arena = Arena(96 << 20)
    with serve_fake_host(arena) as (host, env):
        host.tensors = dc.arena_descriptors(arena, dc.read_nf4_checkpoint(str(ckpt)))
        yield host, env, arena
    arena.close()


def test_run_publishes_decodable_previews_and_returns_pngs(loaded, start_plugin):
    torch = require("torch")
    from PIL import Image

    from arenahost.diffusers_flux import build_small_pipeline

    host, env, arena = loaded
    p = start_plugin([str(PLUGIN)], env)
    stub = pbg.PluginStub(p.channel)
    d = stub.Describe(pb.DescribeRequest(), timeout=10)
    assert d.name == "diffusers-flux" and d.kind == "pipeline" and "run" in [m.name for m in d.methods]
    kept = []
    host.on_publish = lambda req: kept.append(arena.read(req.tensors[0], np.float32).reshape(list(req.tensors[0].shape)))
    w, h, steps = 96, 64, 3
    resp = stub.Invoke(pb.InvokeRequest(method="run", call_id="job-1", args=msgpack.packb(
        {"steps": steps, "seed": 5, "width": w, "height": h, "prompt": "a red fox", "model": "sample"})), timeout=600)
    v = msgpack.unpackb(resp.result)
    assert (v["width"], v["height"], v["steps"], v["layout"], v["patched"]) == (w, h, steps, "flux-bfl", 62)
    assert v["conditioning"] == "stand-in" and "without text encoders" in v["conditioning_note"]
    assert len(v["images"]) == 1
    final = Image.open(io.BytesIO(v["images"][0]))
    assert final.format == "PNG" and final.size == (w, h)

    pubs = [r for r in host.published if r.job_id == "job-1"]
    assert [r.step for r in pubs] == [1, 2, 3] and all(r.topic == "latent" and r.total == steps for r in pubs)
    payload = msgpack.unpackb(pubs[-1].payload)
    assert payload == {"family": "flux", "arch": "flux1", "packed": True, "layout": "packed", "height": h, "width": w,
                       "grid_h": h // 16, "grid_w": w // 16}
    assert all(list(r.tensors[0].shape) == [(h // 16) * (w // 16), 64] for r in pubs)
    # Every step's region but the final ones was freed again.
    assert len(host.freed) >= steps

    # Each preview decodes to an image of the requested size with the pipeline's own VAE; the last is the result.
    pipe = build_small_pipeline()
    imgs = []
    with torch.no_grad():
        for lat in kept:
            t = pipe._unpack_latents(torch.from_numpy(lat)[None], h, w, pipe.vae_scale_factor)
            t = t / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            img = pipe.image_processor.postprocess(pipe.vae.decode(t, return_dict=False)[0], output_type="pil")[0]
            assert img.size == (w, h)
            imgs.append(np.asarray(img, dtype=np.int16))
    assert np.abs(imgs[-1] - np.asarray(final, dtype=np.int16)).max() <= 1
    assert not np.array_equal(imgs[0], imgs[-1])

    # Same seed, same image; a bad size is refused by name.
    again = msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", call_id="job-2", args=msgpack.packb(
        {"steps": steps, "seed": 5, "width": w, "height": h, "prompt": "a red fox", "model": "sample"})), timeout=600).result)
    assert again["images"][0] == v["images"][0]
    with pytest.raises(grpc.RpcError) as e:
        stub.Invoke(pb.InvokeRequest(method="run", args=msgpack.packb({"width": 100})), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "args.width" in e.value.details()


def test_capped_run_without_weight_cache(loaded, start_plugin):
    """cache_weights=false and 512 stand-in tokens (the capped Flux-dev generation's settings) give the
    cached run's image; a memory cap on the CPU is reported as not applied, the peak as 0."""
    host, env, arena = loaded
    p = start_plugin([str(PLUGIN)], {**env, "ARENAHOST_TORCH_MEMORY_CAP": "1GiB"})
    stub = pbg.PluginStub(p.channel)
    args = {"steps": 2, "seed": 3, "width": 32, "height": 32, "prompt": "x", "model": "sample", "stand_in_tokens": 512}
    runs = {}
    for cache in (True, False):
        v = msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", call_id=f"cap-{cache}", args=msgpack.packb(
            {**args, "cache_weights": cache})), timeout=600).result)
        assert v["cache_weights"] is cache and v["peak_torch_bytes"] == 0
        assert "not applied" in v["memory_cap"] and "1073741824" in v["memory_cap"]
        runs[cache] = v["images"][0]
    a = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(runs[True])), dtype=np.int16)
    b = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(runs[False])), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    bf = msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", call_id="cap-bf16", args=msgpack.packb(
        {**args, "cache_weights": False, "dtype": "bfloat16"})), timeout=600).result)
    assert len(bf["images"]) == 1 and bf["images"][0] != runs[False]  # another dtype, another pipeline, other rounding
    for bad in ({"stand_in_tokens": 0}, {"stand_in_tokens": 513}, {"cache_weights": "no"}, {"dtype": "float64"}):
        with pytest.raises(grpc.RpcError) as e:
            stub.Invoke(pb.InvokeRequest(method="run", args=msgpack.packb({**args, **bad})), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "args." + next(iter(bad)) in e.value.details()


def test_plugin_without_torch_starts_and_refuses_run_clearly(loaded, start_plugin):
    """In the core environment the plugin still starts; run names what is missing."""
    from pathlib import Path

    core = Path(SDK.parents[1]) / ".venv" / "bin" / "python"
    if not core.exists():
        pytest.skip("core .venv missing")
    host, env, _ = loaded
    p = start_plugin([str(PLUGIN)], env, python=str(core))
    stub = pbg.PluginStub(p.channel)
    assert stub.Describe(pb.DescribeRequest(), timeout=10).kind == "pipeline"
    with pytest.raises(grpc.RpcError) as e:
        stub.Invoke(pb.InvokeRequest(method="run", args=msgpack.packb({"steps": 1})), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "torch" in e.value.details()


def test_patch_pipeline_example_serves(loaded, start_plugin):
    """examples/patch_pipeline.py: a UI's pipeline handed to arenahost in under 20 lines."""
    host, env, _ = loaded
    src = SDK / "examples" / "patch_pipeline.py"
    assert len(src.read_text().splitlines()) < 20
    p = start_plugin([str(src)], env)
    stub = pbg.PluginStub(p.channel)
    v = msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", args=msgpack.packb(
        {"model": "sample", "steps": 1, "size": 32})), timeout=600).result)
    assert v["summary"].startswith("model 'sample' (flux-bfl): 62 Linear layers patched, 0 left alone, 16 norm scales copied")
    assert 0.0 <= v["mean"] <= 1.0


def test_transformer_method_honours_dtype_and_cache_weights(loaded, start_plugin):
    """The cross-check method runs the transformer in the dtype and weight-cache mode it is given,
    as run does: bfloat16 rounds otherwise than float32, and cache_weights=false keeps no weights."""
    host, env, _ = loaded
    stub = pbg.PluginStub(start_plugin([str(PLUGIN)], env).channel)

    def fwd(**kw):
        return msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="transformer", call_id="tr", args=msgpack.packb(
            {"model": "sample", "seed": 1, "tokens": 16, "txt": 8, **kw})), timeout=600).result)

    f32 = fwd()
    assert (f32["dtype"], f32["cache_weights"]) == ("float32", True)
    bf16 = fwd(dtype="bfloat16", cache_weights=False)
    assert (bf16["dtype"], bf16["cache_weights"]) == ("bfloat16", False), {k: v for k, v in bf16.items() if k != "values"}
    a, b = np.asarray(f32["values"]), np.asarray(bf16["values"])
    assert a.shape == b.shape and np.abs(a - b).max() > 0
    with pytest.raises(grpc.RpcError) as e:
        fwd(dtype="float64")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "args.dtype" in e.value.details()
