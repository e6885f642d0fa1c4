"""diffusers-flux on a bundled single file: its own CLIP-L and T5 encode the prompt, its own VAE decodes.

A Forge/ComfyUI-style single file is built here from a tiny FluxPipeline folder
(:func:`arenahost.diffusers_check.write_tiny_flux_pipeline` with
``released_rules``, so that every width a single file cannot store follows the
released models' rules): the NF4 transformer under ``model.diffusion_model.``,
CLIP-L in F16 under ``text_encoders.clip_l.transformer.``, T5 in F8_E4M3 under
``text_encoders.t5xxl.transformer.`` and the VAE in BF16 under ``vae.``, as
Forge's NF4 files store them. The fake host holds every tensor in its arena; the
plugin runs as a real process with ``model_file`` naming the file, whose folder
holds only ``tokenizer/`` and ``tokenizer_2/``. Checked:

* the result says ``conditioning: text_encoders`` and ``decoder: vae``; two
  prompts give different images, the same prompt the same image;
* the latents of every step and the PNG equal diffusers' own ``FluxPipeline``
  loaded from the folder, with the same weights as stored in the file (CLIP-L
  rounded to F16, T5 to F8_E4M3, the VAE to BF16, the transformer's NF4
  dequantized), same prompt and seed: configs inferred from shapes alone;
* the same with the configs read from a tokenizer_dir that has them;
* the VAE under LDM names (``encoder.down.N.block.M``, attention as 1×1 convs, as Forge stores it),
  converted by diffusers' ``convert_ldm_vae_checkpoint``: the same image;
* no tokenizers: stand-in embeddings with the reason ``no tokenizer``, still the bundled VAE;
* an incomplete CLIP-L (one tensor missing): stand-in naming the missing tensor;
* through a real ``arenahost serve``: the file loaded with ``POST /v1/models``, txt2img passes it as
  ``model_file`` and ``info.conditioning`` is ``text_encoders``, the result's ``decoder`` ``vae``.
"""

import contextlib
import os
import shutil

import msgpack
import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from conftest import SDK, Arena, require, serve_fake_host

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
PLUGIN = SDK / "examples" / "diffusers_flux" / "diffusers_flux.py"
W, H, STEPS, SEED, GUIDANCE = 64, 32, 2, 5, 3.5
PROMPT = "a red fox in the snow"


def _stored(name, t):
    """(numpy array as the file stores it, wire dtype, the fp32 values it holds) for a bundled tensor."""
    import torch

    if name.startswith("text_encoders.clip_l."):
        v = t.to(torch.float16)
        return v.numpy(), pb.DTYPE_F16, v.float()
    if name.startswith("text_encoders.t5xxl."):
        v = t.to(torch.float8_e4m3fn)
        return v.view(torch.uint8).numpy(), pb.DTYPE_F8_E4M3, v.float()
    v = t.to(torch.bfloat16)
    return v.view(torch.int16).numpy().view(np.uint16), pb.DTYPE_BF16, v.float()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    require("torch")
    require("diffusers")
    require("transformers")
    require("tokenizers")
    require("bitsandbytes")
    from safetensors.torch import load_file, save_file

    from arenahost import diffusers_check as dc

    root = tmp_path_factory.mktemp("bundle")
    full = dc.write_tiny_flux_pipeline(str(root / "full"), released_rules=True)
    sd = dc.read_nf4_checkpoint(os.path.join(full, "transformer", "diffusion_pytorch_model.safetensors"))
    extra, values = {}, {}
    for sub, prefix in (("text_encoder", "text_encoders.clip_l.transformer."), ("text_encoder_2", "text_encoders.t5xxl.transformer."),
                        ("vae", "vae.")):
        d = os.path.join(full, sub)
        f = next(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".safetensors"))
        for k, v in load_file(f).items():
            if k == "encoder.embed_tokens.weight":
                continue  # tied to shared.weight; single files store it once
            # Single files name CLIP-L's modules text_model.… (transformers 5 saves them without it).
            name = prefix + ("text_model." + k if sub == "text_encoder" and not k.startswith("text_model.") else k)
            extra[name] = _stored(name, v)
            values[sub, k] = extra[name][2]
    # The single file itself, with only tokenizers beside it.
    files = root / "models"
    files.mkdir()
    for t in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(full, t), files / t)
    import torch

    whole = {"model.diffusion_model." + k: v for k, v in sd.items()}
    for k, (arr, wire, _) in extra.items():
        t = torch.from_numpy(arr)
        whole[k] = t.view(torch.float8_e4m3fn) if wire == pb.DTYPE_F8_E4M3 else t.view(torch.bfloat16) if wire == pb.DTYPE_BF16 else t
    path = str(files / "flux-tiny-bnb-nf4.safetensors")
    save_file(whole, path)
    arena = Arena(64 << 20)
    with serve_fake_host(arena) as (host, env):
        tensors = dc.arena_descriptors(arena, {"model.diffusion_model." + k: v for k, v in sd.items()}, model="bundle")
        for k, (arr, wire, _) in extra.items():
            d = arena.put(k, arr, wire_dtype=wire)
            d.model = "bundle"
            tensors[k] = d
        host.tensors = tensors
        yield dict(full=full, sd=sd, values=values, host=host, env=env, arena=arena, file=path, root=root)
    arena.close()


def _run(stub, call_id, **args):
    base = {"steps": STEPS, "seed": SEED, "width": W, "height": H, "guidance": GUIDANCE, "model": "bundle"}
    return msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", call_id=call_id,
                                                        args=msgpack.packb({**base, **args})), timeout=600).result)


def _reference(b, prompt):
    """diffusers' FluxPipeline from the folder, every weight as the single file stores it: (latents per step, image)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from arenahost import diffusers_check as dc
    from test_diffusers_text_encoders import _dequantized_state

    cfg = {k: v for k, v in FluxTransformer2DModel.load_config(os.path.join(b["full"], "transformer")).items()
           if not k.startswith("_") and k != "quantization_config"}
    ref = FluxPipeline.from_pretrained(b["full"], transformer=dc.plain_transformer(_dequantized_state(b["sd"]), cfg),
                                       torch_dtype=torch.float32, local_files_only=True)
    for sub, mod in (("text_encoder", ref.text_encoder), ("text_encoder_2", ref.text_encoder_2), ("vae", ref.vae)):
        state = {k: v for (s, k), v in b["values"].items() if s == sub}
        missing, unexpected = mod.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (sub, missing, unexpected)
        if sub == "text_encoder_2":
            mod.tie_weights()
    lat = []

    def keep(_p, _i, _t, kw):
        lat.append(kw["latents"][0].float().numpy().copy())
        return kw

    with torch.inference_mode():
        img = ref(prompt=prompt, height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(SEED), output_type="pil",
                  callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images[0]
    return lat, np.asarray(img, dtype=np.int16)


def _pixels(png):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_bundled_file_conditions_and_decodes_with_its_own_components(bundle, start_plugin):
    host, arena = bundle["host"], bundle["arena"]
    p = start_plugin([str(PLUGIN)], bundle["env"])
    stub = pbg.PluginStub(p.channel)
    lat = {}
    host.on_publish = lambda req: lat.setdefault(req.job_id, []).append(
        arena.read(req.tensors[0], np.float32).reshape(list(req.tensors[0].shape)).copy())
    fox = _run(stub, "fox", prompt=PROMPT, model_file=bundle["file"])
    boat = _run(stub, "boat", prompt="a blue boat on a calm lake", model_file=bundle["file"])
    fox2 = _run(stub, "fox2", prompt=PROMPT, model_file=bundle["file"])
    for v in (fox, boat):
        assert v["conditioning_note"] == "" and v["decoder_note"] == ""
        assert (v["conditioning"], v["conditioning_note"], v["decoder"], v["decoder_note"]) == ("text_encoders", "", "vae", ""), \
            {k: x for k, x in v.items() if k != "images"}
        assert v["components"]["transformer_config"] == "inferred from the tensors' shapes", v["components"]
        assert "text_encoders.clip_l.transformer." in v["components"]["text_encoders"]
        assert v["left"] == [] and v["patched"] > 0 and v["note"] == ""
    assert fox2["images"][0] == fox["images"][0]
    assert np.abs(_pixels(fox["images"][0]) - _pixels(boat["images"][0])).max() > 0
    assert np.abs(lat["fox"][-1] - lat["boat"][-1]).max() > 1e-3

    ref_lat, ref_img = _reference(bundle, PROMPT)
    assert len(ref_lat) == len(lat["fox"]) == STEPS
    worst = max(float(np.abs(a - b).max()) for a, b in zip(lat["fox"], ref_lat))
    print(f"bundled single file vs diffusers FluxPipeline: max |Δ latents| {worst:.3g} over {STEPS} steps, "
          f"max |Δ pixel| {int(np.abs(_pixels(fox['images'][0]) - ref_img).max())}")
    # The same fp32 weights and the same F.linear: bit-exact on one machine; the tolerance only
    # allows for two processes' BLAS picking other reduction orders.
    assert worst <= 1e-5
    assert np.abs(_pixels(fox["images"][0]) - ref_img).max() <= 1


def test_bundled_file_with_configs_from_tokenizer_dir(bundle, start_plugin):
    """tokenizer_dir with the folder's configs: used instead of inferring, the same image."""
    stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
    v = _run(stub, "cfg", prompt=PROMPT, tokenizer_dir=bundle["full"])
    assert v["conditioning"] == "text_encoders" and v["decoder"] == "vae", v
    assert v["components"]["transformer_config"] == os.path.join(bundle["full"], "transformer", "config.json")
    inferred = _run(stub, "inferred", prompt=PROMPT, model_file=bundle["file"])
    assert inferred["images"][0] == v["images"][0]
    # model_dir naming a pipeline folder for a bundled model: the bundle's own encoders and VAE (from
    # the arena) with the folder's configs and tokenizers, not the folder's weights.
    d = _run(stub, "dir", prompt=PROMPT, model_dir=bundle["full"])
    assert d["conditioning"] == "text_encoders" and d["decoder"] == "vae", d
    assert d["components"]["text_encoders"].startswith("arena (") and d["components"]["vae"].startswith("arena (vae."), d["components"]
    assert d["images"][0] == v["images"][0]


def test_bundled_file_without_tokenizers_says_so(bundle, start_plugin, tmp_path):
    stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
    lonely = tmp_path / "alone" / "flux.safetensors"  # no tokenizer/ beside it
    lonely.parent.mkdir()
    v = _run(stub, "lonely", prompt=PROMPT, model_file=str(lonely))
    assert v["conditioning"] == "stand-in" and v["conditioning_note"].startswith("no tokenizer: a bundled single file carries none")
    assert str(lonely.parent) in v["conditioning_note"]
    assert v["decoder"] == "vae" and _pixels(v["images"][0]).shape == (H, W, 3)


def test_incomplete_bundled_encoder_is_not_used(bundle, start_plugin):
    host = bundle["host"]
    gone = "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    saved = host.tensors.pop(gone)
    try:
        stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
        v = _run(stub, "partial", prompt=PROMPT, model_file=bundle["file"])
    finally:
        host.tensors[gone] = saved
    assert v["conditioning"] == "stand-in", v
    assert v["conditioning_note"] == f"bundled CLIP-L is incomplete: no {gone}", v["conditioning_note"]
    assert v["decoder"] == "vae"


def test_bad_companion_folder(bundle, start_plugin, tmp_path):
    """A tokenizer_dir whose config is not JSON is the caller's mistake, named; one whose config
    disagrees with the bundled tensors leaves the encoders out, saying which tensor."""
    import json

    import grpc

    stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
    bad = tmp_path / "bad"
    shutil.copytree(bundle["full"], bad, ignore=shutil.ignore_patterns("*.safetensors"))
    (bad / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(grpc.RpcError) as e:
        _run(stub, "bad", prompt=PROMPT, model="bundle-bad", tokenizer_dir=str(bad))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert str(bad / "text_encoder" / "config.json") in e.value.details()
    other = tmp_path / "other"
    shutil.copytree(bundle["full"], other, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((other / "text_encoder_2" / "config.json").read_text())
    cfg["d_ff"] = 48
    (other / "text_encoder_2" / "config.json").write_text(json.dumps(cfg))
    v = _run(stub, "other", prompt=PROMPT, model="bundle-other", tokenizer_dir=str(other))
    assert v["conditioning"] == "stand-in" and v["decoder"] == "vae", v
    assert v["conditioning_note"].startswith("bundled T5: text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0.weight "
                                             f"has shape [37, 32], the model built from {other / 'text_encoder_2' / 'config.json'} "
                                             "wants [48, 32]"), v["conditioning_note"]


def _vae_ldm_name(k: str, levels: int) -> str:
    """A diffusers AutoencoderKL key under the LDM name Forge/ComfyUI single files use (encoder.down.N.block.M…)."""
    import re

    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", k)
    k = re.sub(r"^(decoder\.up\.\d+)\.resnets\.(\d+)\.", r"\1.block.\2.", k)
    k = re.sub(r"^(decoder\.up\.\d+)\.upsamplers\.0\.conv\.", r"\1.upsample.conv.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    for d, ldm in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(".attn_1." + d + ".", ".attn_1." + ldm + ".")
    return k


def test_bundled_vae_in_ldm_names(bundle, start_plugin):
    """The VAE under its LDM names (as Forge's NF4 files store it, attention as 1×1 convs) is
    converted by diffusers' own convert_ldm_vae_checkpoint: the same image as the diffusers-named one."""
    host, arena = bundle["host"], bundle["arena"]
    saved = dict(host.tensors)
    levels = 1 + max(int(k.split(".")[2]) for (s, k) in bundle["values"] if s == "vae" and k.startswith("encoder.down_blocks."))
    try:
        for (sub, k), v in bundle["values"].items():
            if sub != "vae":
                continue
            del host.tensors["vae." + k]
            ldm = _vae_ldm_name(k, levels)
            if ".attn_1." in ldm and ldm.endswith(".weight") and v.dim() == 2:
                v = v[:, :, None, None]  # LDM's attention q/k/v/proj_out are 1×1 convs
            arr, wire, _ = _stored("vae." + ldm, v.contiguous())
            d = arena.put("vae." + ldm, arr, wire_dtype=wire)
            d.model = "bundle-ldm"
            host.tensors["vae." + ldm] = d
        assert not any(".down_blocks." in n for n in host.tensors if n.startswith("vae."))
        stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
        ldm = _run(stub, "ldm", prompt=PROMPT, model="bundle-ldm", model_file=bundle["file"])
    finally:
        host.tensors.clear()
        host.tensors.update(saved)
    assert (ldm["decoder"], ldm["decoder_note"]) == ("vae", ""), {k: v for k, v in ldm.items() if k != "images"}
    stub = pbg.PluginStub(start_plugin([str(PLUGIN)], bundle["env"]).channel)
    plain = _run(stub, "plain", prompt=PROMPT, model_file=bundle["file"])
    assert ldm["images"][0] == plain["images"][0]


def _dequantized_any(sd):
    """fp32 weights of an NF4 state dict by bitsandbytes' rule (element k = quant_map[nibble k] ·
    absmax[k // blocksize], high nibble first), a last partial block included."""
    from arenahost import diffusers_check as dc

    qw = set(dc.quant_weights(sd))
    out = {}
    for w in qw:
        st = dc.bnb_quant_state(sd, w)
        p = sd[w].reshape(-1)
        q = np.stack([p.numpy() >> 4, p.numpy() & 0x0F], 1).reshape(-1).astype(np.int64)
        n = int(np.prod(st.shape))
        scale = np.repeat(st.absmax.float().numpy(), st.blocksize)[:n]
        import torch

        out[w] = torch.from_numpy((st.code.float().numpy()[q[:n]] * scale).reshape(tuple(st.shape)))
    for k, v in sd.items():
        if k not in qw and not any(k.startswith(w + ".") for w in qw):
            out[k] = v.float()
    return out


@contextlib.contextmanager
def _real_host(tmp_path, models_src):
    """A real `arenahost serve` (diffusers-flux the txt2img pipeline) whose --models-dir is a copy of models_src."""
    from test_diffusers_host import serve_host

    data = tmp_path / "data"
    (data / "loras").mkdir(parents=True)
    shutil.copytree(models_src, data / "models")
    with serve_host(tmp_path, data) as h:
        yield h


def _txt2img(h, model, prompt=PROMPT):
    import base64
    import json

    st, r = h.call("POST", "/sdapi/v1/txt2img", {
        "prompt": prompt, "steps": STEPS, "seed": SEED, "width": W, "height": H,
        "override_settings": {"sd_model_checkpoint": model}}, timeout=300)
    assert st == 200, (st, r, h.log.read_text()[-3000:])
    return json.loads(r["info"]), _pixels(base64.b64decode(r["images"][0]))


def test_txt2img_on_a_bundled_single_file_uses_its_components(bundle, tmp_path):
    """Through a real host: the single file loaded with POST /v1/models (tokenizers beside it in
    --models-dir); txt2img passes the file as model_file and info says its text encoders
    conditioned the image; its VAE decoded it."""
    with _real_host(tmp_path, os.path.dirname(bundle["file"])) as h:
        name = os.path.basename(bundle["file"])
        st, m = h.call("POST", "/v1/models", {"path": name, "name": "tiny-bundle"})
        assert st == 201, (st, m)
        info, _ = _txt2img(h, "tiny-bundle")
        assert info["conditioning"] == "text_encoders" and info["decoder"] == "vae" and not info["warnings"], info
        st, s = h.call("GET", f"/v1/jobs/{info['jobs'][0]}")
        assert s["params"]["model_file"] == str((h.data / "models" / name).resolve()), s["params"]
        res = s["result"]
        assert (res["conditioning"], res["decoder"]) == ("text_encoders", "vae"), {k: v for k, v in res.items() if k != "images"}
        assert res["components"]["vae"] == "arena (vae.)"


@pytest.mark.parametrize("storage", ["nf4", "f16-f8"])
def test_text_encoder_lora_on_bundled_encoders(bundle, tmp_path, storage):
    """Bundled CLIP-L and T5 in bitsandbytes NF4, or as Forge stores them (F16 and F8_E4M3): a kohya
    LoRA with lora_te1_ (CLIP-L) and lora_te3_ (T5) keys, applied by txt2img's <lora:…> tag through
    a real host (side mode), conditions the image as diffusers' FluxPipeline with the LoRA merged
    into the encoder weights as stored does; removing it gives back the LoRA-free image bit for bit.
    On F16/F8 encoders, the same LoRA fused (POST /v1/loras/apply mode fuse) gives diffusers' image
    with the LoRA merged in the stored dtypes, (w.float() + delta).to(dtype)."""
    import base64

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, T5EncoderModel

    from arenahost import diffusers_check as dc

    full = bundle["full"]
    src = tmp_path / "src"
    src.mkdir()
    for t in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(full, t), src / t)
    whole = load_file(bundle["file"])
    te4, te_deq, n4 = {}, {}, 0
    for cls, sub, prefix in ((CLIPTextModel, "text_encoder", "text_encoders.clip_l.transformer."),
                             (T5EncoderModel, "text_encoder_2", "text_encoders.t5xxl.transformer.")):
        enc = cls.from_pretrained(os.path.join(full, sub), local_files_only=True)
        q = dc.nf4_state(enc)
        q.pop("encoder.embed_tokens.weight", None)
        n4 += len(dc.quant_weights(q))
        if storage == "f16-f8":  # the encoders as the bundle stores them
            te_deq[sub] = {k: v for (s2, k), v in bundle["values"].items() if s2 == sub}
            continue
        te_deq[sub] = _dequantized_any(q)
        for k in [k for k in whole if k.startswith(prefix)]:
            del whole[k]
        for k, v in q.items():
            name = prefix + ("text_model." + k if sub == "text_encoder" and not k.startswith("text_model.") else k)
            te4[name] = v
    whole.update(te4)
    save_file(whole, str(src / "flux-tiny-te.safetensors"))
    # The LoRA: q and v of every CLIP-L and T5 attention layer, kohya keys.
    g = torch.Generator().manual_seed(11)
    rank, alpha = 4, 4.0
    lora, deltas = {}, {}
    for sub, te, stem_of in (("text_encoder", "lora_te1_", lambda k: "text_model." + k),
                             ("text_encoder_2", "lora_te3_", lambda k: k)):
        for k, w in te_deq[sub].items():
            if not (k.endswith("q_proj.weight") or k.endswith("v_proj.weight") or k.endswith("SelfAttention.q.weight")
                    or k.endswith("SelfAttention.v.weight")):
                continue
            key = te + stem_of(k[: -len(".weight")]).replace(".", "_")
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
            lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = down, up
            lora[key + ".alpha"] = torch.tensor(alpha)
            deltas[sub, k] = (alpha / rank) * (up @ down)
    assert len(deltas) == 8

    with _real_host(tmp_path, src) as h:
        save_file(lora, str(h.data / "loras" / "te_lora.safetensors"))
        st, m = h.call("POST", "/v1/models", {"path": "flux-tiny-te.safetensors", "name": "tiny-te4"})
        assert st == 201, (st, m)
        info0, base = _txt2img(h, "tiny-te4")
        assert info0["conditioning"] == "text_encoders", info0
        st, s = h.call("GET", f"/v1/jobs/{info0['jobs'][0]}")
        assert f"{n4} Linear layers" in s["result"]["components"].get("text_encoder_layers", ""), s["result"]["components"]
        # txt2img applies the prompt's <lora:…> set in side mode (and an empty set removes it).
        info1, side = _txt2img(h, "tiny-te4", PROMPT + " <lora:te_lora:1>")
        assert [e["name"] for e in info1["loras"]] == ["te_lora"] and not info1["warnings"], info1
        _, again = _txt2img(h, "tiny-te4")
        if storage == "f16-f8":
            # Fused: POST /v1/loras/apply mode fuse rewrites the F16/F8 encoder weights in place, then a
            # job that applies no LoRA set (txt2img would apply the prompt's, in side mode) generates.
            st, r = h.call("POST", "/v1/loras/apply", {"model": "tiny-te4", "mode": "fuse",
                                                       "loras": [{"name": "te_lora", "strength": 1.0}]})
            assert st == 200, (st, r)
            assert sum(w.startswith("text_encoders.") for w in r["fused"]) == 8, r["fused"]
            spec = {"pipeline": "diffusers-flux", "params": {"prompt": PROMPT, "steps": STEPS, "seed": SEED,
                                                              "width": W, "height": H, "model": "tiny-te4"}}
            s = h.job(spec)
            assert s["state"] == "done", s
            fused = _pixels(base64.b64decode(s["result"]["images"][0]))
            st, r = h.call("DELETE", "/v1/loras?model=tiny-te4")
            assert st == 200, (st, r)
            s = h.job(spec)
            unfused = _pixels(base64.b64decode(s["result"]["images"][0]))

    # diffusers' FluxPipeline with the dequantized NF4 encoders plus the merged LoRA.
    b = dict(bundle)
    b["values"] = dict(bundle["values"])
    for sub in ("text_encoder", "text_encoder_2"):
        for k, v in te_deq[sub].items():
            b["values"][sub, k] = v + deltas.get((sub, k), 0)
    _, want = _reference(b, PROMPT)
    for sub in ("text_encoder", "text_encoder_2"):
        for k, v in te_deq[sub].items():
            b["values"][sub, k] = v
    _, want_base = _reference(b, PROMPT)
    d_side, d_lora = int(np.abs(side - want).max()), int(np.abs(want - want_base).max())
    print(f"TE LoRA on {storage} bundled encoders, side mode vs diffusers with the LoRA merged: max |Δ pixel| {d_side}; "
          f"the LoRA itself moves pixels by up to {d_lora}; base vs diffusers: {int(np.abs(base - want_base).max())}")
    assert d_lora > 8
    assert np.abs(base - want_base).max() <= 1
    assert d_side <= 2
    assert np.array_equal(again, base)
    if storage == "f16-f8":
        # A fused merge keeps each weight's dtype: diffusers with (w.float() + delta).to(dtype), as the
        # file would store the merged encoders.
        stored = {"text_encoder": torch.float16, "text_encoder_2": torch.float8_e4m3fn}
        for sub in ("text_encoder", "text_encoder_2"):
            for k, v in te_deq[sub].items():
                if (sub, k) in deltas:
                    b["values"][sub, k] = (v.float() + deltas[sub, k]).to(stored[sub]).float()
        _, want_fused = _reference(b, PROMPT)
        d_fused = int(np.abs(fused - want_fused).max())
        print(f"TE LoRA fused into F16/F8 bundled encoders vs diffusers with the LoRA merged in the stored dtypes: "
              f"max |Δ pixel| {d_fused}; vs merged in fp32: {int(np.abs(fused - want).max())}")
        assert d_fused <= 2
        assert np.array_equal(unfused, base)


def _regions(msg):
    """Every Region inside a descriptor (its own, and its 4-bit state's absmax / quant_map / nested ones)."""
    for f, v in msg.ListFields():
        if f.message_type is None:
            continue
        for m in (v if getattr(f, "is_repeated", False) else [v]):
            if isinstance(m, pb.Region):
                yield m
            else:
                yield from _regions(m)


@contextlib.contextmanager
def _reloaded(b, drop=""):
    """The host unloads the bundle and loads the same file again under the same name (or, with drop,
    another file without the tensors under that prefix): every tensor in a new region (new offset
    and generation), and the old regions freed and reused (overwritten with 0xFF, NaN in every
    float dtype). Undone on exit."""
    host, arena = b["host"], b["arena"]
    old = dict(host.tensors)
    used = arena.next
    saved = bytes(arena.mm[:used])
    new = {}
    for name, d in old.items():
        if drop and name.startswith(drop):
            continue
        nd = pb.TensorDescriptor()
        nd.CopyFrom(d)
        for r in _regions(nd):
            fresh = arena.alloc(name + "#reload", pb.DTYPE_U8, [r.length]).region
            arena.mm[fresh.offset:fresh.offset + r.length] = arena.mm[r.offset:r.offset + r.length]
            r.CopyFrom(fresh)
        new[name] = nd
    try:
        with host.lock:
            host.tensors = new
        for d in old.values():
            for r in _regions(d):
                arena.mm[r.offset:r.offset + r.length] = b"\xff" * r.length
        yield
    finally:
        with host.lock:
            host.tensors = old
        arena.mm[:used] = saved


def _client(b):
    from arenahost.host import HostClient

    return HostClient(b["env"]["ARENAHOST_HOST_ADDR"], b["env"]["ARENAHOST_HOST_TOKEN"])


def _params(b, model="bundle", **kw):
    from arenahost import diffusers_pipeline as dp

    return dp._parse({"model": model, "model_file": b["file"], **kw}, "call")


def _vae_state(pipe):
    return {k: v.detach().float().clone() for k, v in pipe.vae.state_dict().items()}


def test_reload_under_the_same_name_rebuilds_from_the_new_load(bundle):
    """A model the host unloads and loads again under the same name is a new load: the next job's
    pipeline is built from it (VAE, encoders, components), not the old load's, which read freed
    arena memory; and a pipeline never aliases the arena for its non-Linear weights (a BF16 VAE in
    a bfloat16 pipeline is copied), so one held across the unload keeps its values."""
    require("transformers")
    import torch

    from arenahost import diffusers_pipeline as dp

    st = dp._State()
    p = _params(bundle, dtype="bfloat16")
    with _client(bundle) as host:
        pipe, _ = dp._pipeline(st, host, p)
        assert pipe._arenahost_decoder == ("vae", "") and pipe.vae.dtype == torch.bfloat16
        before = _vae_state(pipe)
        emb = pipe.text_encoder.get_input_embeddings().weight.detach().float().clone()
        with _reloaded(bundle):
            # The old pipeline, still held, reads none of the freed (now NaN) bytes.
            held = _vae_state(pipe)
            assert all(torch.equal(held[k], before[k]) for k in before), \
                [k for k in before if not torch.equal(held[k], before[k])][:3]
            assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach().float(), emb)
            again, report = dp._pipeline(st, host, p)
            assert again is not pipe, "a reloaded model reused the previous load's pipeline"
            assert list(st.pipes) and all(v is again for v in st.pipes.values()) and len(st.patched) == 1
            now = _vae_state(again)
            assert all(torch.equal(now[k], before[k]) for k in before)
            # Unchanged load: the same pipeline again, nothing rebuilt.
            assert dp._pipeline(st, host, p)[0] is again
        # Back to the first load (the test's undo is another reload): rebuilt once more.
        assert dp._pipeline(st, host, p)[0] is not again
        # Another file under the same name, without a VAE: its own components, not the cached ones.
        with _reloaded(bundle, drop="vae."):
            other, _ = dp._pipeline(st, host, p)
            assert other._arenahost_decoder[0] == "stand-in" and "vae" not in other._arenahost_components
            assert st.bundles["bundle"][2] == {"te1": "text_encoders.clip_l.transformer.", "t5": "text_encoders.t5xxl.transformer."}


def test_new_key_builds_once_and_drops_the_old_pipeline(bundle, monkeypatch):
    """Another dtype or cache_weights (a new pipeline key) builds exactly one pipeline and keeps
    only it: one pipeline at a time, so the previous one's weights and caches are freed."""
    require("transformers")
    from arenahost import diffusers_bundled as db
    from arenahost import diffusers_pipeline as dp

    builds = []
    real = db.build_bundled_pipeline

    def counted(*a, **kw):
        builds.append(kw.get("dtype"))
        return real(*a, **kw)

    monkeypatch.setattr(db, "build_bundled_pipeline", counted)
    st = dp._State()
    with _client(bundle) as host:
        first, _ = dp._pipeline(st, host, _params(bundle))
        assert len(builds) == 1 and dp._pipeline(st, host, _params(bundle))[0] is first and len(builds) == 1
        for i, kw in enumerate(({"dtype": "bfloat16"}, {"dtype": "bfloat16", "cache_weights": False}, {})):
            pipe, report = dp._pipeline(st, host, _params(bundle, **kw))
            assert len(builds) == 2 + i, (kw, builds)
            assert list(st.pipes.values()) == [pipe] and list(st.patched.values()) == [report], kw
            assert pipe is not first
