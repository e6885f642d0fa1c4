"""Side mode against ComfyUI's own LoRA loader; fuse mode's bytes against the host's.

In this process, ComfyUI 0.30's modules (as `main.py --cpu` configures them)
build two models:

* the pack's: "Load NF4 model (arenahost)" over the real host's arena copy of
  the sample NF4 checkpoint, then "LoRA (arenahost)" in side mode with the
  host's two sample LoRAs (kohya and PEFT keys);
* ComfyUI's: the same weights dequantized by bitsandbytes' rule to a bf16
  checkpoint, loaded with ComfyUI's own ``UNETLoader``, and the same two LoRA
  files through ComfyUI's own ``LoraLoaderModelOnly``.

Every patched linear's effective weight (the pack: dequantized W + B_cat·A_cat;
ComfyUI: its patched weight) and one forward of the whole model agree within
fp32 tolerance, before and after a strength change (a rebind). Fuse mode:
the bytes the pack's layers read are the bytes the host's digest hashes, and
removal restores the original digest.
"""

import hashlib
import logging

import numpy as np
import pytest
import torch

KOHYA, PEFT = "flux-sample-kohya-lora", "flux-sample-peft-lora"


@pytest.fixture(scope="module")
def comfy_dirs(tmp_path_factory, host):
    import folder_paths

    base = tmp_path_factory.mktemp("comfy-inproc")
    dm = base / "diffusion_models"
    dm.mkdir()
    folder_paths.add_model_folder_path("diffusion_models", str(dm), is_default=True)
    folder_paths.add_model_folder_path("loras", str(host.data / "loras"), is_default=True)
    return dm


def dequantized_checkpoint(host, path):
    """The host's sample model with every NF4 weight dequantized (bnb rule, bf16): what ComfyUI's UNETLoader loads."""
    from safetensors.torch import save_file

    from arenahost.torch import as_tensor, dequantize_4bit
    from arenahost_comfyui.client import HostHTTP

    h = HostHTTP(host.url)
    sd = {}
    for d in h.lookup_tensors("sample").tensors:
        if d.HasField("quant"):
            sd[d.name] = dequantize_4bit(d, h.mapper).contiguous()
        else:
            sd[d.name] = as_tensor(d, h.mapper, writable=False).clone()
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    save_file(sd, str(path))


def pack_model(host, *loras, mode="side"):
    from arenahost_comfyui.nodes import LoadNF4ModelArenahost, LoRAArenahost

    m = LoadNF4ModelArenahost().load("sample", host_url=host.url)["result"][0]
    kw = {}
    for i, (n, s) in enumerate(loras, 1):
        kw[f"lora_{i}"], kw[f"strength_{i}"] = n, s
    out = LoRAArenahost().apply(m, mode, **kw)
    return out["result"][0], out["ui"]["text"]


def comfy_model(name, *loras):
    import comfy.model_management as mm
    import nodes

    m = nodes.UNETLoader().load_unet(name, "default")[0]
    for n, s in loras:
        m = nodes.LoraLoaderModelOnly().load_lora_model_only(m, n + ".safetensors", s)[0]
    mm.load_models_gpu([m], force_full_load=True)
    return m


def linears(patcher):
    from arenahost_comfyui.flux import ArenaSession  # noqa: F401

    opts = patcher.model_options["transformer_options"]["arenahost"]
    return opts["session"].linears  # arena weight name -> ArenaNF4Linear


def effective(lin):
    w = lin.dequantized_weight().clone()
    f = lin.factors()
    if f is not None:
        w += f[1] @ f[0]
    return w


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g) * 0.5
    y = torch.randn(1, 768, generator=g) * 0.5
    return dict(x=x, t=torch.tensor([0.7]), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5]))


def forward(patcher, inp):
    with torch.no_grad():
        return patcher.model.apply_model(inp["x"], inp["t"], c_crossattn=inp["c_crossattn"], y=inp["y"], guidance=inp["guidance"]).float()


def compare(pack, base, n_patched):
    sd = base.model.diffusion_model.state_dict()
    lins = linears(pack)
    assert len(lins) == 42
    changed = 0
    worst = 0.0
    for name, lin in sorted(lins.items()):
        ours = effective(lin)
        theirs = sd[name].float()
        assert ours.shape == theirs.shape, name
        err = (ours - theirs).abs().max().item()
        worst = max(worst, err / max(theirs.abs().max().item(), 1e-12))
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), f"{name}: max |Δ| {err}"
        if lin.factors() is not None:
            changed += 1
    assert changed == n_patched
    a, b = forward(pack, inputs()), forward(base, inputs())
    assert torch.isfinite(a).all()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-4, f"forward differs: max |Δ|/max|y| = {rel}"
    return worst, rel


def test_side_mode_matches_comfyui_lora_loader(host, comfy_dirs, caplog):
    dequantized_checkpoint(host, comfy_dirs / "sample-bf16.safetensors")
    caplog.set_level(logging.WARNING)
    pack, text = pack_model(host, (KOHYA, 0.8), (PEFT, 0.5))
    base = comfy_model("sample-bf16.safetensors", (KOHYA, 0.8), (PEFT, 0.5))
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], "ComfyUI left LoRA keys unapplied"
    plain = comfy_model("sample-bf16.safetensors")
    # The LoRAs change the model (so agreement is not vacuous).
    assert (forward(base, inputs()) - forward(plain, inputs())).abs().max() > 1e-3
    compare(pack, base, n_patched=32)
    assert any("matched 32 keys" in t for t in text), text

    # Strength change: a rebind in the host, no reload here.
    gen = host.get("/v1/loras/state?model=sample")["binding_generation"]
    pack2, _ = pack_model(host, (KOHYA, -0.4), (PEFT, 1.3))
    assert host.get("/v1/loras/state?model=sample")["binding_generation"] > gen
    assert linears(pack2) is linears(pack)  # same modules, same arena mapping
    compare(pack2, comfy_model("sample-bf16.safetensors", (KOHYA, -0.4), (PEFT, 1.3)), n_patched=32)


def region_sha(lin):
    from arenahost.tensor import map_region_bytes  # noqa: F401

    d = lin._wdesc
    b = lin.watcher.mapper.bytes(d.name, d.region, d.region.length)
    return hashlib.sha256(np.asarray(b).tobytes()).hexdigest()


def test_fuse_mode_sees_the_hosts_bytes_and_removal_is_byte_exact(host, comfy_dirs):
    from arenahost_comfyui.client import HostHTTP
    from arenahost_comfyui.nodes import LoadNF4ModelArenahost, reconcile

    h = HostHTTP(host.url)
    h.remove_loras("sample")
    orig = h.digest("sample", detail=True)
    base = LoadNF4ModelArenahost().load("sample", host_url=host.url)["result"][0]
    before = {n: effective(l) for n, l in linears(base).items()}

    fused, text = pack_model(host, (KOHYA, 0.8), (PEFT, 0.5), mode="fuse")
    assert any("retention" in t for t in text), text
    st = h.lora_state("sample")
    assert st["mode"] == "fuse"
    dig = h.digest("sample", detail=True)
    assert dig["sha256"] != orig["sha256"]
    lins = linears(fused)
    changed = 0
    for name, lin in lins.items():
        lin.dequantized_weight()  # sync with the host's current regions
        assert region_sha(lin) == dig["per_tensor"][name], f"{name}: the pack reads other bytes than the host holds"
        assert lin.factors() is None, "fuse mode binds no side factors"
        if not torch.equal(effective(lin), before[name]):
            changed += 1
    assert changed == 32

    # A graph without the LoRA node samples the loader's MODEL: the sampler's reconcile removes the set.
    opts = base.model_options["transformer_options"]["arenahost"]
    reconcile(opts["session"], opts["mode"], opts["loras"])
    assert h.lora_state("sample").get("loras") == []
    assert h.digest("sample")["sha256"] == orig["sha256"]
    opts["session"].watcher.poll()
    for name, lin in lins.items():
        assert region_sha(lin) == orig["per_tensor"][name]
        assert torch.equal(effective(lin), before[name]), name
