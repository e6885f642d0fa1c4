"""diffusers-flux on a whole pipeline folder: the folder's CLIP-L and T5 encode the prompt, its VAE decodes.

The host carries a pipeline folder's text_encoder/, text_encoder_2/ and vae/
in the arena beside its transformer, under the prefixes a bundled single file
uses (shared/checkpoint.OpenModel); the plugin builds them from the arena
(:func:`arenahost.diffusers_bundled.build_bundled_pipeline` with ``folder``),
and falls back to ``from_pretrained`` only for a part the arena lacks.

A tiny FluxPipeline folder is written here with no download
(:func:`arenahost.diffusers_check.write_tiny_flux_pipeline`: tokenizers trained
from a few sentences, a tiny CLIPTextModel and T5EncoderModel from configs, a
tiny AutoencoderKL, a tiny FluxTransformer2DModel in bitsandbytes NF4). The
fake host holds that NF4 transformer in its arena, with the folder's encoders
and VAE under their prefixes as the real registry holds them; the plugin runs
as a real process with ``model_dir`` pointing at the folder. Checked:

* two prompts give different prompt embeddings and different images, the same
  prompt the same image, and the result says ``conditioning: text_encoders``
  and, in ``components``, that the encoders and the VAE came from the arena;
* the published latents and the PNG equal diffusers' own ``FluxPipeline``
  loaded from the same folder (``pipe(prompt=...)``, same seed), with the
  transformer holding the same NF4 weights dequantized by bnb's rule (written out in the test);
* a host holding only the transformer: ``from_pretrained`` from the folder, said
  in ``components``, the same image;
* a text_encoder/ with a tensor missing, an extra one, or a config.json that
  disagrees: stand-in, the note naming the folder's tensor (and config);
* a folder without text encoders still runs, on stand-in embeddings, and says so;
* through a real ``arenahost serve``: the folder loaded with ``POST /v1/models``
  (``GET /v1/models`` lists its components and their folders),
  ``/sdapi/v1/txt2img`` and ``POST /v1/jobs`` pass it as ``model_dir`` and
  ``info.conditioning`` / the result's ``conditioning`` is ``text_encoders``; a
  kohya text-encoder LoRA in the prompt conditions the image as diffusers does
  with it merged.
"""

import contextlib
import io
import os

import msgpack
import numpy as np
import pytest

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.plugin.v1 import plugin_pb2_grpc as pbg
from conftest import SDK, Arena, require, serve_fake_host

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
PLUGIN = SDK / "examples" / "diffusers_flux" / "diffusers_flux.py"
W, H, STEPS, SEED, GUIDANCE = 64, 32, 2, 7, 3.5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    require("torch")
    require("diffusers")
    require("transformers")
    require("tokenizers")
    require("bitsandbytes")
    from arenahost import diffusers_check as dc

    root = tmp_path_factory.mktemp("pipes")
    full = dc.write_tiny_flux_pipeline(str(root / "full"))
    bare = dc.write_tiny_flux_pipeline(str(root / "bare"), text_encoders=False)
    sd = dc.read_nf4_checkpoint(os.path.join(full, "transformer", "diffusion_pytorch_model.safetensors"))
    arena = Arena(64 << 20)
    with serve_fake_host(arena) as (host, env):
        only = dc.arena_descriptors(arena, sd, model="tiny")
        # What the host's registry holds for the folder: the transformer and, under the
        # bundled prefixes, the folder's text encoders and VAE.
        whole = dc.arena_descriptors(arena, {**sd, **folder_components(full)}, model="tiny")
        host.tensors = whole
        yield dict(full=full, bare=bare, sd=sd, host=host, env=env, arena=arena, whole=whole, only=only)
    arena.close()


# The prefixes shared/checkpoint.OpenModel gives a Flux pipeline folder's components.
PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer.", "vae": "vae."}


def folder_components(folder):
    """{arena name: tensor} of the folder's text_encoder/, text_encoder_2/ and vae/ safetensors
    (every shard), named as the host's registry names them."""
    import glob

    from safetensors.torch import load_file

    out = {}
    for sub, pre in PREFIXES.items():
        for f in sorted(glob.glob(os.path.join(folder, sub, "*.safetensors"))):
            out.update({pre + k: v for k, v in load_file(f).items()})
    return out


@contextlib.contextmanager
def _holding(folders, which):
    """The fake host holds folders[which]'s tensors for the block."""
    folders["host"].tensors = folders[which]
    try:
        yield
    finally:
        folders["host"].tensors = folders["whole"]


def _run(stub, call_id, **args):
    base = {"steps": STEPS, "seed": SEED, "width": W, "height": H, "guidance": GUIDANCE, "model": "tiny"}
    return msgpack.unpackb(stub.Invoke(pb.InvokeRequest(method="run", call_id=call_id,
                                                        args=msgpack.packb({**base, **args})), timeout=600).result)


def _dequantized_state(sd):
    """fp32 weights of the NF4 checkpoint by bitsandbytes' documented rule, written out here:
    element k = quant_map[nibble k] · absmax[k // blocksize], high nibble first.

    (bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is not used: on weights its own CPU
    ``quantize_4bit`` wrote in fp32 it returns values off by up to 1.9 on a randn [64, 32]
    where this rule reconstructs within the NF4 step, 0.39.)"""
    import torch

    from arenahost import diffusers_check as dc

    qw = set(dc.quant_weights(sd))
    out = {}
    for w in qw:
        st = dc.bnb_quant_state(sd, w)
        p = sd[w].reshape(-1)
        q = torch.stack([p >> 4, p & 0x0F], 1).reshape(-1).long()
        out[w] = (st.code.float()[q].reshape(-1, st.blocksize) * st.absmax.float()[:, None]).reshape(st.shape)
    for k, v in sd.items():
        if k not in qw and not any(k.startswith(w + ".") for w in qw):
            out[k] = v.float()
    return out


def _pixels(png):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_folder_text_encoders_condition_the_image_as_diffusers_does(folders, start_plugin):
    torch = require("torch")
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from arenahost import diffusers_check as dc
    from arenahost.diffusers_flux import build_small_pipeline, encode_prompt, folder_text_components

    full, host, arena = folders["full"], folders["host"], folders["arena"]
    assert folder_text_components(full) == (True, "")

    # (1) Different prompts, different conditioning (the folder's own encoders, in process).
    pipe = build_small_pipeline(full)
    a = encode_prompt(pipe, "a red fox in the snow")
    b = encode_prompt(pipe, "a blue boat on a calm lake")
    assert a[2] == b[2] == "text_encoders"
    assert a[0].shape == (1, 512, 32) and a[1].shape == (1, 32)
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[1] - b[1]).abs().max() > 1e-3

    p = start_plugin([str(PLUGIN)], folders["env"])
    stub = pbg.PluginStub(p.channel)
    lat = {}
    host.on_publish = lambda req: lat.setdefault(req.job_id, []).append(
        arena.read(req.tensors[0], np.float32).reshape(list(req.tensors[0].shape)).copy())
    fox = _run(stub, "fox", prompt="a red fox in the snow", model_dir=full)
    boat = _run(stub, "boat", prompt="a blue boat on a calm lake", model_dir=full)
    fox2 = _run(stub, "fox2", prompt="a red fox in the snow", model_dir=full)
    for v in (fox, boat):
        assert (v["conditioning"], v["conditioning_note"]) == ("text_encoders", "")
        assert v["layout"] == "flux-diffusers" and v["left"] == [] and v["patched"] > 0
        assert _pixels(v["images"][0]).shape == (H, W, 3)
    assert fox2["images"][0] == fox["images"][0]
    # Built from the arena: the folder's configs and tokenizers, the weights the host loaded once.
    comps = fox["components"]
    assert comps["text_encoders"].startswith("arena (text_encoders.clip_l.transformer., text_encoders.t5xxl.transformer.: ") and \
        os.path.join(full, "text_encoder", "config.json") in comps["text_encoders"], comps
    assert comps["vae"] == f"arena (vae.: {os.path.join(full, 'vae')})", comps
    assert "Linear layers read from the arena" in comps["text_encoder_layers"], comps
    assert fox["decoder"] == "vae"
    assert np.abs(_pixels(fox["images"][0]) - _pixels(boat["images"][0])).max() > 0
    assert np.abs(lat["fox"][-1] - lat["boat"][-1]).max() > 1e-3

    # (2) diffusers' own FluxPipeline on the same folder and seed, its transformer
    # holding the arena's NF4 weights dequantized by bitsandbytes.
    cfg = {k: v for k, v in FluxTransformer2DModel.load_config(os.path.join(full, "transformer")).items()
           if not k.startswith("_") and k != "quantization_config"}
    ref = FluxPipeline.from_pretrained(full, transformer=dc.plain_transformer(_dequantized_state(folders["sd"]), cfg),
                                       torch_dtype=torch.float32, local_files_only=True)
    ref_lat = []

    def keep(_p, _i, _t, kw):
        ref_lat.append(kw["latents"][0].float().numpy().copy())
        return kw

    with torch.inference_mode():
        img = ref(prompt="a red fox in the snow", height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(SEED), output_type="pil",
                  callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"]).images[0]
    assert len(ref_lat) == len(lat["fox"]) == STEPS
    for mine, theirs in zip(lat["fox"], ref_lat):
        # Bit-exact on this machine's CPU (max difference 0.0, PNGs identical): the same fp32
        # weights, the same F.linear. The tolerance only allows for the two processes' BLAS
        # picking different reduction orders (thread counts) elsewhere.
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5)
    print(f"max |latent - FluxPipeline's| = {max(float(np.abs(m - t).max()) for m, t in zip(lat['fox'], ref_lat))}, "
          f"max |pixel diff| = {int(np.abs(_pixels(fox['images'][0]) - np.asarray(img, dtype=np.int16)).max())}")
    assert np.abs(_pixels(fox["images"][0]) - np.asarray(img, dtype=np.int16)).max() <= 1


def test_folder_parts_not_in_the_arena_load_from_the_folder(folders, start_plugin):
    """A host that carries only the transformer (the folder's components are not safetensors,
    or an older host): the plugin loads them with from_pretrained, says so, and the image is
    the one the arena-built pipeline gives."""
    with _holding(folders, "only"):
        p = start_plugin([str(PLUGIN)], folders["env"])
        stub = pbg.PluginStub(p.channel)
        v = _run(stub, "fallback", prompt="a red fox in the snow", model_dir=folders["full"])
    assert v["conditioning"] == "text_encoders"
    assert v["components"]["text_encoders"].startswith("from_pretrained (") and "not in the arena" in v["components"]["text_encoders"]
    assert v["components"]["vae"].startswith("from_pretrained (")
    p2 = start_plugin([str(PLUGIN)], folders["env"])
    w = _run(pbg.PluginStub(p2.channel), "arena", prompt="a red fox in the snow", model_dir=folders["full"])
    assert w["components"]["text_encoders"].startswith("arena (")
    assert w["images"][0] == v["images"][0]


@pytest.mark.parametrize("fault", ["missing", "extra", "config"])
def test_folder_encoder_that_disagrees_is_named(folders, start_plugin, tmp_path, fault):
    """A folder whose text_encoder/ lacks a tensor, has one its config does not, or whose
    config.json disagrees with the weights: the prompt falls back to stand-in embeddings and
    the note names the folder's file and tensor (and the config)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from arenahost import diffusers_check as dc

    bad = tmp_path / "bad"
    shutil.copytree(folders["full"], bad)
    st = bad / "text_encoder" / "model.safetensors"
    sd = load_file(str(st))
    inner = "text_model." if any(k.startswith("text_model.") for k in sd) else ""  # transformers 4 / 5 names
    key = inner + "encoder.layers.0.mlp.fc1.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        sd[inner + "encoder.layers.9.mlp.fc1.weight"] = sd[key].clone()
    save_file(sd, str(st), metadata={"format": "pt"})
    if fault == "config":
        cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
        cfg["intermediate_size"] += 8
        (bad / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    host, arena = folders["host"], folders["arena"]
    host.tensors = dc.arena_descriptors(arena, {**folders["sd"], **folder_components(str(bad))}, model="tiny")
    try:
        p = start_plugin([str(PLUGIN)], folders["env"])
        v = _run(pbg.PluginStub(p.channel), "bad-te", prompt="x", model_dir=str(bad))
    finally:
        host.tensors = folders["whole"]
    note = v["conditioning_note"]
    assert v["conditioning"] == "stand-in", v
    where = f"{bad / 'text_encoder'}/ tensor "
    want = {"missing": f"is incomplete: no {where}{key}",
            "extra": f"{where}{inner}encoder.layers.9.mlp.fc1.weight is not a tensor of the model built from "
                     f"{bad / 'text_encoder' / 'config.json'}",
            "config": f"{where}{key} has shape"}[fault]
    assert want in note, note
    assert f"pipeline folder {bad}'s CLIP-L" in note, note
    assert v["decoder"] == "vae"  # the VAE is fine


def test_folder_without_text_encoders_runs_on_stand_in_embeddings(folders, start_plugin):
    from arenahost.diffusers_flux import folder_text_components

    bare = folders["bare"]
    has, why = folder_text_components(bare)
    assert not has and "text_encoder" in why
    p = start_plugin([str(PLUGIN)], folders["env"])
    stub = pbg.PluginStub(p.channel)
    with _holding(folders, "only"):  # what the host holds for a folder without encoders
        v = _run(stub, "bare", prompt="a red fox in the snow", model_dir=bare)
    assert v["conditioning"] == "stand-in" and "model_index.json names no text_encoder" in v["conditioning_note"]
    assert _pixels(v["images"][0]).shape == (H, W, 3)


def test_txt2img_on_a_pipeline_folder_model_uses_its_text_encoders(folders, tmp_path):
    """Through a real host: a pipeline folder loaded with POST /v1/models; txt2img passes the folder
    to diffusers-flux as model_dir, and info says the text encoders conditioned the image."""
    import json
    import shutil

    from test_diffusers_host import serve_host

    data = tmp_path / "data"
    (data / "loras").mkdir(parents=True)
    shutil.copytree(folders["full"], data / "models" / "tiny-pipe")
    with serve_host(tmp_path, data) as h:
        st, m = h.call("POST", "/v1/models", {"path": "tiny-pipe", "name": "tiny-pipe"})
        assert st == 201, (st, m)
        # The folder's text encoders and VAE are in the arena with the transformer, listed as components.
        st, ms = h.call("GET", "/v1/models")
        got = {c["kind"]: c for c in next(x for x in ms if x["name"] == "tiny-pipe")["components"]}
        folder = (data / "models" / "tiny-pipe").resolve()
        assert set(got) == {"te1", "t5", "vae"}, got
        for kind, sub, pre in (("te1", "text_encoder", "text_encoders.clip_l."), ("t5", "text_encoder_2", "text_encoders.t5xxl."),
                               ("vae", "vae", "vae.")):
            assert got[kind]["prefix"] == pre and got[kind]["tensors"] > 0, got[kind]
            assert os.path.realpath(got[kind]["source"]) == str(folder / sub), got[kind]
        st, r = h.call("POST", "/sdapi/v1/txt2img", {
            "prompt": "a red fox in the snow", "steps": 2, "seed": 7, "width": 64, "height": 32,
            "override_settings": {"sd_model_checkpoint": "tiny-pipe"}}, timeout=300)
        assert st == 200, (st, r, (tmp_path / "host.log").read_text()[-3000:])
        info = json.loads(r["info"])
        assert info["conditioning"] == "text_encoders", info
        assert not any("stand-in" in w for w in info["warnings"]), info["warnings"]
        job = info["jobs"][0]
        st, s = h.call("GET", f"/v1/jobs/{job}")
        assert s["params"]["model_dir"] == str((data / "models" / "tiny-pipe").resolve()), s["params"]
        assert s["result"]["conditioning"] == "text_encoders"
        assert s["result"]["components"]["text_encoders"].startswith("arena ("), s["result"]["components"]
        assert s["result"]["components"]["vae"].startswith("arena (vae."), s["result"]["components"]
        # POST /v1/jobs naming the model: the host adds model_dir the same way.
        s = h.job({"pipeline": "diffusers-flux", "params": {"model": "tiny-pipe", "prompt": "a blue boat", "steps": 1,
                                                            "width": 32, "height": 32}})
        assert s["state"] == "done", s
        assert s["params"]["model_dir"] == str((data / "models" / "tiny-pipe").resolve())
        assert s["result"]["conditioning"] == "text_encoders"


def test_bad_folders_are_refused_by_name(folders, start_plugin, tmp_path):
    import grpc
    import shutil

    p = start_plugin([str(PLUGIN)], folders["env"])
    stub = pbg.PluginStub(p.channel)
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    bad_json = tmp_path / "bad_json"
    shutil.copytree(folders["bare"], bad_json)
    (bad_json / "model_index.json").write_text("{not json")
    no_te = tmp_path / "no_te_folder"
    shutil.copytree(folders["full"], no_te)
    shutil.rmtree(no_te / "text_encoder_2")
    for d, want in ((no_index, "no model_index.json"), (bad_json, "model_index.json")):
        with pytest.raises(grpc.RpcError) as e:
            _run(stub, "bad", prompt="x", model_dir=str(d))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "args.model_dir" in e.value.details() and want in e.value.details() and str(d) in e.value.details()
    # Named in model_index.json but its folder is gone: stand-in, saying what is missing
    # (the host carries no encoders for such a folder: shared/checkpoint.OpenModel notes it).
    with _holding(folders, "only"):
        v = _run(stub, "no-te", prompt="x", model_dir=str(no_te))
    assert v["conditioning"] == "stand-in" and "no text_encoder_2/ folder" in v["conditioning_note"]


def test_text_encoder_lora_on_a_pipeline_folders_encoders(folders, tmp_path):
    """Through a real host: a kohya LoRA with lora_te1_ (CLIP-L) and lora_te3_ (T5) keys, in
    txt2img's <lora:…> tag (side mode), reaches the folder's encoders the host carries in the arena
    (plain F32, CLIP named as transformers 5 saves it, without text_model.): every key matched, the
    image equals diffusers' FluxPipeline with the LoRA merged into the folder's encoder weights,
    and the prompt without the tag gives back the LoRA-free image bit for bit."""
    import shutil

    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    from arenahost import diffusers_check as dc
    from test_diffusers_bundled import GUIDANCE as G, H as BH, SEED as S, STEPS as N, W as BW, _real_host, _txt2img

    full = folders["full"]
    src = tmp_path / "src"
    shutil.copytree(full, src / "tiny-pipe")
    g = torch.Generator().manual_seed(11)
    rank, alpha = 4, 4.0
    lora, deltas = {}, {}
    for sub, te in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te3_")):
        for k, w in load_file(os.path.join(full, sub, "model.safetensors")).items():
            if not k.endswith(("q_proj.weight", "v_proj.weight", "SelfAttention.q.weight", "SelfAttention.v.weight")):
                continue
            stem = k[: -len(".weight")]
            if sub == "text_encoder" and not stem.startswith("text_model."):
                stem = "text_model." + stem  # kohya names CLIP with text_model. whatever the folder says
            key = te + stem.replace(".", "_")
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
            lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = down, up
            lora[key + ".alpha"] = torch.tensor(alpha)
            deltas[sub, k] = (alpha / rank) * (up @ down)
    assert len(deltas) == 8

    with _real_host(tmp_path, src) as h:
        save_file(lora, str(h.data / "loras" / "te_lora.safetensors"))
        st, m = h.call("POST", "/v1/models", {"path": "tiny-pipe", "name": "tiny-pipe"})
        assert st == 201, (st, m)
        info0, base = _txt2img(h, "tiny-pipe")
        assert info0["conditioning"] == "text_encoders", info0
        info1, side = _txt2img(h, "tiny-pipe", "a red fox in the snow <lora:te_lora:1>")
        assert [e["name"] for e in info1["loras"]] == ["te_lora"] and not info1["warnings"], info1
        st, s = h.call("GET", f"/v1/jobs/{info1['jobs'][0]}")
        assert s["result"]["components"]["text_encoders"].startswith("arena ("), s["result"]["components"]
        _, again = _txt2img(h, "tiny-pipe")

    cfg = {k: v for k, v in FluxTransformer2DModel.load_config(os.path.join(full, "transformer")).items()
           if not k.startswith("_") and k != "quantization_config"}

    def reference(with_lora):
        ref = FluxPipeline.from_pretrained(full, transformer=dc.plain_transformer(_dequantized_state(folders["sd"]), cfg),
                                           torch_dtype=torch.float32, local_files_only=True)
        if with_lora:
            for sub in ("text_encoder", "text_encoder_2"):
                mod = getattr(ref, sub)
                state = load_file(os.path.join(full, sub, "model.safetensors"))
                for (s2, k), d in deltas.items():
                    if s2 == sub:
                        state[k] = state[k] + d
                missing, unexpected = mod.load_state_dict(state, strict=False)
                assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (sub, missing, unexpected)
                if sub == "text_encoder_2":
                    mod.tie_weights()
        with torch.inference_mode():
            img = ref(prompt="a red fox in the snow", height=BH, width=BW, num_inference_steps=N, guidance_scale=G,
                      generator=torch.Generator().manual_seed(S), output_type="pil").images[0]
        return np.asarray(img, dtype=np.int16)

    want, want_base = reference(True), reference(False)
    d_side, d_lora = int(np.abs(side - want).max()), int(np.abs(want - want_base).max())
    print(f"TE LoRA on a pipeline folder's arena encoders, side mode vs diffusers with the LoRA merged: max |Δ pixel| {d_side}; "
          f"the LoRA itself moves pixels by up to {d_lora}; base vs diffusers: {int(np.abs(base - want_base).max())}")
    assert d_lora > 8
    assert np.abs(base - want_base).max() <= 1
    assert d_side <= 1
    assert np.array_equal(again, base)
