"""Side mode against diffusers + PEFT on the same small Flux transformer.

One way: diffusers' own ``FluxPipeline.load_lora_weights`` loads a PEFT-keyed
LoRA and a kohya LoRA onto a ``FluxTransformer2DModel`` holding the sample
model's weights dequantized by bitsandbytes itself (and converted BFL →
diffusers by this test's own converter). The other way: a fresh transformer
is patched onto the arena copy of the same NF4 checkpoint with
:func:`arenahost.diffusers_flux.patch_pipeline`, and the same two LoRAs are
bound as side factors. The transformer outputs agree within fp32 tolerance,
before and after a rebind (strength change, remove).

The NF4 checkpoint is written by the real ``bin/arenahost sample``. The host
is the SDK tests' fake Host service over a memfd arena; the factors are
computed by :func:`arenahost.diffusers_check.side_factors_from_files` (the
Python statement of the engine's side rule) and bound by :func:`bind_side`.
Switching to the host's ``POST /v1/loras/apply`` replaces that one function.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from conftest import SDK, Arena, require, serve_fake_host

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = SDK.parents[1]


def arenahost_bin() -> Path:
    """arenahost in $ARENAHOST_BIN (the bin directory `make test` passes), else bin/arenahost."""
    b = Path(os.environ.get("ARENAHOST_BIN") or ROOT / "bin") / "arenahost"
    if not b.exists():
        if os.environ.get("ARENAHOST_REQUIRE_PYTHON") == "1":
            pytest.fail(f"{b} missing: run make build")
        pytest.skip(f"{b} missing: run make build")
    return b


def write_sample(out: Path, *flags: str) -> Path:
    """The sample NF4 Flux model (`arenahost sample`, with extra flags such as --nested) in out."""
    subprocess.run([str(arenahost_bin()), "sample", "--out", str(out), *flags], check=True, capture_output=True, timeout=120)
    return out / "flux-sample-nf4.safetensors"


def flux_inputs(torch, seed=3):
    from arenahost.diffusers_check import flux_inputs as fi

    return fi(seed)


class SideBinder:
    """Binds side factors in the fake host the way the host registry does (new regions, new generation)."""

    def __init__(self, host, arena, cfg, bfl_shapes):
        self.host, self.arena, self.cfg, self.shapes = host, arena, cfg, bfl_shapes
        self.gen = 0

    def bind_side(self, loras):
        """The one function a real host replaces: POST /v1/loras/apply {mode: side}."""
        from arenahost.diffusers_check import side_factors_from_files

        facs = side_factors_from_files(loras, self.cfg, self.shapes)
        self.gen += 1
        new = {}
        for w, (a, b) in facs.items():
            da = self.arena.put(f"factors/{w}/A", a.numpy())
            db = self.arena.put(f"factors/{w}/B", b.numpy())
            new[w] = pb.LayerFactors(layer=w, a=da, b=db, binding_generation=self.gen)
        with self.host.lock:
            self.host.factors = new
        return sorted(new)

    def remove(self):
        with self.host.lock:
            self.host.factors = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch = require("torch")
    require("diffusers")
    require("peft")
    require("bitsandbytes")
    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import SAMPLE_TRANSFORMER_CONFIG

    tmp = tmp_path_factory.mktemp("side")
    ckpt = write_sample(tmp)
    sd = dc.read_nf4_checkpoint(str(ckpt))
    bfl = dc.dequantized_bfl_state(sd)
    diff = dc.bfl_to_diffusers_state(bfl)
    peft_path = dc.write_peft_lora(str(tmp / "style_peft.safetensors"), diff, SAMPLE_TRANSFORMER_CONFIG)
    kohya_path = dc.write_kohya_lora(str(tmp / "detail_kohya.safetensors"), bfl)
    arena = Arena(64 << 20)
    with serve_fake_host(arena) as (host, env):
        host.tensors = dc.arena_descriptors(arena, sd)
        yield dict(torch=torch, sd=sd, bfl=bfl, diff=diff, peft=peft_path, kohya=kohya_path, arena=arena, host=host,
                   env=env, cfg=SAMPLE_TRANSFORMER_CONFIG)
    arena.close()


def diffusers_reference(w, strengths):
    """diffusers + PEFT: both LoRAs loaded by FluxPipeline.load_lora_weights on the dequantized weights."""
    from diffusers import FluxPipeline

    from arenahost.diffusers_check import plain_transformer

    t = plain_transformer(w["diff"], w["cfg"])
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=t)
    pipe.load_lora_weights(w["peft"], adapter_name="peft")
    pipe.load_lora_weights(w["kohya"], adapter_name="kohya")
    n_lora = {a: sum(1 for m in t.modules() if hasattr(m, "base_layer") and a in getattr(m, "lora_A", {})) for a in ("peft", "kohya")}
    pipe.set_adapters(["peft", "kohya"], adapter_weights=list(strengths))
    return t, n_lora


def patched(w):
    from diffusers import FluxTransformer2DModel

    from arenahost.diffusers_flux import patch_pipeline
    from arenahost.host import HostClient

    torch = w["torch"]
    torch.manual_seed(123)  # different random init: everything used must come from the arena
    t = FluxTransformer2DModel(**w["cfg"]).float().eval()
    client = HostClient(w["env"]["ARENAHOST_HOST_ADDR"], w["env"]["ARENAHOST_HOST_TOKEN"])
    report = patch_pipeline(t, client, model="sample")
    return t, report


def test_patch_report_covers_every_linear(world):
    t, report = patched(world)
    torch = world["torch"]
    assert report.layout == "flux-bfl" and report.prefix == ""
    assert len(report.patched) == 62 and not report.left, report.left  # 8 + 2×14 + 4×6 + 2 diffusers Linears
    assert report.patched["transformer_blocks.0.attn.to_k"] == "double_blocks.0.img_attn.qkv.weight rows [(256, 256)]"
    assert report.patched["single_transformer_blocks.1.proj_mlp"] == "single_blocks.1.linear1.weight rows [(768, 1024)]"
    assert report.patched["norm_out.linear"] == "final_layer.adaLN_modulation.1.weight rows [(256, 256), (0, 256)]"
    assert len(report.copied) == 2 * 4 + 4 * 2
    assert not any(isinstance(m, torch.nn.Linear) for m in t.modules())


def test_split_layers_are_bnb_rows(world):
    """A split layer's weight is exactly its rows of bnb's dequantized fused weight."""
    t, _ = patched(world)
    bfl = world["bfl"]
    for name, src, r0, n in [("transformer_blocks.1.attn.add_v_proj", "double_blocks.1.txt_attn.qkv", 512, 256),
                             ("single_transformer_blocks.3.proj_mlp", "single_blocks.3.linear1", 768, 1024),
                             ("x_embedder", "img_in", 0, 256)]:
        got = t.get_submodule(name).dequantized_weight()
        want = bfl[src + ".weight"][r0 : r0 + n]
        assert got.dtype == want.dtype and bool((got == want).all()), name


def test_side_mode_matches_diffusers_peft(world):
    torch = world["torch"]
    host, arena = world["host"], world["arena"]
    bfl_shapes = {k: tuple(v.shape) for k, v in world["bfl"].items() if k.endswith(".weight") and v.dim() == 2}
    binder = SideBinder(host, arena, world["cfg"], bfl_shapes)
    t_arena, report = patched(world)
    inp = flux_inputs(torch)

    with torch.no_grad():
        base_ref = __import__("arenahost.diffusers_check", fromlist=["x"]).plain_transformer(world["diff"], world["cfg"])(**inp)[0]
        base = t_arena(**inp)[0]
    np.testing.assert_allclose(base.numpy(), base_ref.numpy(), rtol=1e-4, atol=1e-4)

    ref, n_lora = diffusers_reference(world, (1.0, 0.7))
    # PEFT: 8 per double, 6 per single block, 3 top-level; kohya: 10 per double, 2 per single block.
    assert n_lora == {"peft": 2 * 8 + 4 * 6 + 3, "kohya": 2 * 10 + 4 * 2}, n_lora
    bound = binder.bind_side([(world["peft"], "peft", 1.0), (world["kohya"], "kohya", 0.7)])
    assert "single_blocks.0.linear1.weight" in bound and "final_layer.adaLN_modulation.1.weight" in bound
    with torch.no_grad():
        want = ref(**inp)[0]
        got = t_arena(**inp)[0]  # the pre-hook polls the host once: the new bindings are used with no reload
    assert float((want - base_ref).abs().max()) > 1e-2, "the LoRAs must change the output for this check to mean anything"
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=2e-4)

    # Strength change: rebinding is picked up by the next call.
    ref.set_adapters(["peft", "kohya"], weights=[0.3, -0.5])
    binder.bind_side([(world["peft"], "peft", 0.3), (world["kohya"], "kohya", -0.5)])
    with torch.no_grad():
        np.testing.assert_allclose(t_arena(**inp)[0].numpy(), ref(**inp)[0].numpy(), rtol=1e-4, atol=2e-4)
    # Remove: back to the base output.
    binder.remove()
    with torch.no_grad():
        np.testing.assert_allclose(t_arena(**inp)[0].numpy(), base_ref.numpy(), rtol=1e-4, atol=1e-4)
    assert report.watcher.polls >= 4


def test_mismatched_config_is_refused_without_change(world):
    from diffusers import FluxTransformer2DModel

    from arenahost.diffusers_flux import patch_pipeline
    from arenahost.host import HostClient
    from arenahost.tensor import DescriptorError

    torch = world["torch"]
    cfg = dict(world["cfg"], num_attention_heads=1)  # hidden 128: does not fit the 256-wide checkpoint
    t = FluxTransformer2DModel(**cfg).float().eval()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    client = HostClient(world["env"]["ARENAHOST_HOST_ADDR"], world["env"]["ARENAHOST_HOST_TOKEN"])
    with pytest.raises(DescriptorError, match=r"img_in.weight|x_embedder|time_in"):
        patch_pipeline(t, client, model="sample")
    after = t.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.Linear) for m in t.modules())


def test_diffusers_layout_checkpoint_with_prefix(world):
    """A checkpoint in diffusers names under a prefix maps 1:1 (plain F32 weights here)."""
    from diffusers import FluxTransformer2DModel

    from arenahost.diffusers_check import plain_transformer
    from arenahost.diffusers_flux import patch_pipeline
    from arenahost.host import HostClient

    torch = world["torch"]
    arena = Arena(96 << 20)
    try:
        with serve_fake_host(arena) as (host, env):
            host.tensors = {"transformer." + k: arena.put("transformer." + k, v.contiguous().numpy()) for k, v in world["diff"].items()}
            t = FluxTransformer2DModel(**world["cfg"]).float().eval()
            report = patch_pipeline(t, HostClient(env["ARENAHOST_HOST_ADDR"], env["ARENAHOST_HOST_TOKEN"]), model="sample")
            assert (report.layout, report.prefix, len(report.patched), len(report.copied)) == ("flux-diffusers", "transformer.", 62, 16)
            assert report.patched["norm_out.linear"] == "transformer.norm_out.linear.weight"
            inp = flux_inputs(torch)
            with torch.no_grad():
                np.testing.assert_allclose(t(**inp)[0].numpy(), plain_transformer(world["diff"], world["cfg"])(**inp)[0].numpy(), rtol=1e-5, atol=1e-5)
    finally:
        arena.close()
