"""A whole FluxPipeline from a bundled single file in the arena (optional: needs torch, diffusers, transformers).

Forge and ComfyUI single files carry the Flux transformer under
``model.diffusion_model.`` with CLIP-L (``text_encoders.clip_l.transformer.``),
T5 (``text_encoders.t5xxl.transformer.``) and the VAE (``vae.`` or
``first_stage_model.``) beside it. :func:`build_bundled_pipeline` builds a
diffusers ``FluxPipeline`` whose CLIP-L, T5 and VAE hold those weights read
from the host's arena (the model is loaded once, by the host; 4-bit weights
are dequantized by bitsandbytes' rule, F8 widened, a tensor already in the
pipeline's dtype copied, so that nothing but the Linear layers, which follow
the arena, reads the arena after the build), and whose transformer is patched
onto the arena model by :func:`arenahost.diffusers_flux.patch_pipeline`.

A diffusers pipeline folder loaded by the host carries its ``text_encoder/``,
``text_encoder_2/`` and ``vae/`` in the arena under the same prefixes
(``shared/checkpoint.OpenModel``); ``build_bundled_pipeline(..., folder=DIR)``
builds it the same way, with the folder's configs, tokenizers and scheduler.

A single file holds no configs and no tokenizers:

* **Tokenizers** are looked for in the folders given (the plugin passes a
  configured folder and the folder beside the file): each must hold
  ``tokenizer/`` (CLIP) and ``tokenizer_2/`` (T5), as a diffusers FluxPipeline
  folder does. Without them the prompt cannot be encoded: conditioning is
  ``stand-in`` with the reason ``no tokenizer …``.
* **Configs** come from the same folder when it has them
  (``text_encoder/config.json``, ``text_encoder_2/config.json``,
  ``vae/config.json``, ``transformer/config.json``, ``scheduler/``); otherwise
  each is inferred from the tensors' shapes. What shapes cannot say follows the
  released models: CLIP attention heads are 64 wide (CLIP-L: 768 = 12 × 64),
  CLIP-L's ``eos_token_id`` 2 and ``quick_gelu``; T5's heads from its
  relative-attention bias, gated-GELU when ``wi_0``/``wi_1`` exist; the VAE's
  GroupNorm has 32 groups and FLUX.1's scaling (0.3611) and shift (0.1159);
  the transformer's RoPE axes split the head width as FLUX.1 does
  (d/8, 7d/16, 7d/16: 16, 56, 56 for 128).

A component that is missing or incomplete (a tensor the model needs is
absent, or a shape disagrees) is not used, and the pipeline says why:
``_arenahost_conditioning`` is ``("text_encoders", "")`` or ``("stand-in",
why)``, ``_arenahost_decoder`` is ``("vae", "")`` or ``("stand-in", why)``
(then a small random VAE decodes, and the image means nothing).
"""

from __future__ import annotations

import json
import os

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import DescriptorError

__all__ = [
    "CLIP_PREFIX",
    "T5_PREFIX",
    "VAE_PREFIXES",
    "bundled_components",
    "find_tokenizers",
    "flux_config_from_shapes",
    "clip_config_from_state",
    "t5_config_from_state",
    "vae_config_from_state",
    "build_bundled_pipeline",
]

CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIXES = ("vae.", "first_stage_model.")
_SIDE = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def _is_side(name: str) -> bool:
    return ".quant_state." in name or name.endswith(_SIDE)


def bundled_components(names) -> dict[str, str]:
    """{"te1"|"t5"|"vae": prefix} for the text encoders and VAE a checkpoint's tensor names bundle."""
    out = {}
    for n in names:
        if n.startswith(CLIP_PREFIX):
            out.setdefault("te1", CLIP_PREFIX)
        elif n.startswith(T5_PREFIX):
            out.setdefault("t5", T5_PREFIX)
        else:
            for p in VAE_PREFIXES:
                if n.startswith(p):
                    out.setdefault("vae", p)
    return out


def find_tokenizers(dirs, whose: str = "a bundled single file") -> tuple[str, str]:
    """(folder, "") for the first of dirs holding tokenizer/ and tokenizer_2/, else ("", why)."""
    looked = []
    for d in dirs:
        if not d:
            continue
        if os.path.isdir(os.path.join(d, "tokenizer")) and os.path.isdir(os.path.join(d, "tokenizer_2")):
            return d, ""
        looked.append(d)
    where = ("; looked for tokenizer/ and tokenizer_2/ in " + ", ".join(looked)) if looked else \
        "; name a folder holding tokenizer/ and tokenizer_2/ (a diffusers FluxPipeline folder's) with tokenizer_dir"
    return "", f"no tokenizer: {whose} carries none" + where


def _folder_config(folder: str, sub: str) -> dict | None:
    if not folder:
        return None
    path = os.path.join(folder, sub, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


def _count(names, prefix: str) -> int:
    n = 0
    for k in names:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                n = max(n, int(head) + 1)
    return n


def flux_config_from_shapes(shapes: dict[str, list[int]], layout: str) -> dict:
    """FluxTransformer2DModel config of a Flux transformer from its tensor shapes (names without prefix)."""
    def dim(name, i):
        s = shapes.get(name)
        if s is None or len(s) <= i:
            raise ValueError(f"bundled transformer: no {name} to read its width from")
        return int(s[i])

    if layout == "flux-bfl":
        n = dict(x="img_in.weight", ctx="txt_in.weight", vec="vector_in.in_layer.weight", dbl="double_blocks.",
                 sgl="single_blocks.", head="double_blocks.0.img_attn.norm.query_norm.scale", guid="guidance_in.in_layer.weight",
                 mlp="double_blocks.0.img_mlp.0.weight", out="final_layer.linear.weight")
    else:
        n = dict(x="x_embedder.weight", ctx="context_embedder.weight", vec="time_text_embed.text_embedder.linear_1.weight",
                 dbl="transformer_blocks.", sgl="single_transformer_blocks.", head="transformer_blocks.0.attn.norm_q.weight",
                 guid="time_text_embed.guidance_embedder.linear_1.weight", mlp="transformer_blocks.0.ff.net.0.proj.weight",
                 out="proj_out.weight")
    hidden, head = dim(n["x"], 0), dim(n["head"], 0)
    if head <= 0 or hidden % head or head % 16:
        raise ValueError(f"bundled transformer: head width {head} (from {n['head']}) does not divide the hidden width {hidden} "
                         "into FLUX.1's RoPE axes; give a transformer/config.json in tokenizer_dir")
    in_ch, out_ch = dim(n["x"], 1), dim(n["out"], 0)
    return dict(patch_size=1, in_channels=in_ch, out_channels=None if out_ch == in_ch else out_ch,
                num_layers=_count(shapes, n["dbl"]), num_single_layers=_count(shapes, n["sgl"]),
                attention_head_dim=head, num_attention_heads=hidden // head, joint_attention_dim=dim(n["ctx"], 1),
                pooled_projection_dim=dim(n["vec"], 1), guidance_embeds=n["guid"] in shapes,
                axes_dims_rope=(head // 8, 7 * head // 16, 7 * head // 16))


def clip_config_from_state(sd: dict) -> dict:
    """CLIPTextConfig kwargs from a CLIP text model's state (transformers names without ``text_model.``)."""
    tok = sd["embeddings.token_embedding.weight"].shape
    hidden = int(tok[1])
    if hidden % 64:
        raise ValueError(f"bundled CLIP-L: hidden width {hidden} is not a multiple of CLIP's 64-wide heads; "
                         "give a text_encoder/config.json in tokenizer_dir")
    return dict(vocab_size=int(tok[0]), hidden_size=hidden, num_attention_heads=hidden // 64,
                intermediate_size=int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=_count(sd, "encoder.layers."),
                max_position_embeddings=int(sd["embeddings.position_embedding.weight"].shape[0]),
                hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=hidden)


def t5_config_from_state(sd: dict) -> dict:
    """T5Config kwargs from a T5 encoder's state (transformers names)."""
    emb = sd["shared.weight"].shape if "shared.weight" in sd else sd["encoder.embed_tokens.weight"].shape
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    heads = int(bias[1])
    q = int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return dict(vocab_size=int(emb[0]), d_model=int(emb[1]), num_heads=heads, d_kv=q // heads, d_ff=int(ff),
                num_layers=_count(sd, "encoder.block."), relative_attention_num_buckets=int(bias[0]),
                feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def vae_config_from_state(sd: dict) -> dict:
    """AutoencoderKL config from a VAE's state in diffusers names."""
    levels = _count(sd, "encoder.down_blocks.")
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]), out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                block_out_channels=tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)),
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                layers_per_block=_count(sd, "encoder.down_blocks.0.resnets."), norm_num_groups=32,
                scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def _ldm_vae_to_diffusers(sd: dict) -> dict:
    """A VAE state in LDM names (encoder.down.N.block.M…, Forge/ComfyUI) in diffusers names, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = _count(sd, "encoder.down.")
    cfg = dict(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    return convert_ldm_vae_checkpoint({"vae." + k: v for k, v in sd.items()}, cfg)


def _tensor(d, mapper, dtype):
    """One arena tensor in dtype, in memory of its own.

    A tensor already stored in dtype is copied too, not used in place: the
    pipeline outlives the load it was built from (the host may unload the model
    and reuse its regions, or load another under the same name), and a VAE,
    embedding or norm that aliased the arena would then read freed memory. The
    plugin also rebuilds when the load changes (``diffusers_pipeline``), but a
    pipeline still running, or held in its cache, must never see reused bytes.
    Linear layers are not read here: ArenaNF4Linear follows the arena itself."""
    from arenahost import torch as at

    if d.HasField("quant"):
        return at.dequantize_4bit(d, mapper, dtype=dtype)
    t = at.as_tensor(d, mapper, writable=False)
    return t.to(dtype) if t.dtype != dtype and t.is_floating_point() else t.clone()


def _arena_state(tensors: dict, prefix: str, mapper, dtype, *, lazy: bool = False) -> dict:
    """{name without prefix: torch tensor} of the arena tensors under prefix, in dtype.

    lazy: 2-D weights become meta tensors of their logical shape (nothing read):
    an encoder's Linear weights are read from the arena by ArenaNF4Linear on each
    forward instead, and :func:`_materialize` reads the other 2-D ones (embeddings)."""
    import torch

    out = {}
    for name, d in tensors.items():
        if not name.startswith(prefix) or _is_side(name):
            continue
        if lazy and name.endswith(".weight"):
            from arenahost.diffusers_flux import _logical_shape

            shape = _logical_shape(d)
            if len(shape) == 2:
                out[name[len(prefix):]] = torch.empty(shape, dtype=dtype, device="meta")
                continue
        out[name[len(prefix):]] = _tensor(d, mapper, dtype)
    return out


def _materialize(model, arena_name, tensors: dict, mapper, dtype) -> str:
    """Read every parameter of model still on the meta device from the arena ("" or why not)."""
    import torch

    for n, p in list(model.named_parameters(remove_duplicate=False)):
        if not p.is_meta:
            continue
        d = tensors.get(arena_name(n))
        if d is None:
            return f"no {arena_name(n)}"
        parent, _, attr = n.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        setattr(mod, attr, torch.nn.Parameter(_tensor(d, mapper, dtype), requires_grad=False))
    return ""


def _load(model, sd: dict, what: str, file_name, tied=(), *, whose: str = "bundled", config: str = "",
          strict_extra: bool = False) -> str:
    """Load sd into model (assign, strict on what the model needs); "" or why it cannot.

    sd's keys are transformers names without CLIP's ``text_model.`` (what
    transformers 5 uses; a model that still wants it gets it added).
    file_name(key) is the key's name in the single file (or the folder), for
    the message; whose says whose component it is ("bundled", or a pipeline
    folder's), config the config file the model was built from (for the
    message). strict_extra: a tensor the model does not have is an error too
    (a folder's weights written by save_pretrained match their config).
    """
    want = model.state_dict()
    src = {k: k.removeprefix("text_model.") for k in want}
    built = f"the model built from {config}" if config else "the model built from its config"
    missing = sorted(k for k in want if src[k] not in sd and k not in tied)
    if missing:
        first = file_name(src[missing[0]])
        return (f"{whose} {what} is incomplete: no {first}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + (f", which {built} has" if config else ""))
    if strict_extra:
        have = set(src.values())
        # Not weights of the text model: buffers older transformers saved, and the CLIP projection /
        # logit scale single files carry (the folder may be given for a bundled file's configs too).
        extra = sorted(k for k in sd if k not in have and not k.endswith(("position_ids", "text_projection.weight", "logit_scale")))
        if extra:
            return (f"{whose} {what}: {file_name(extra[0])} is not a tensor of {built}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, v in want.items():
        if src[k] in sd and tuple(sd[src[k]].shape) != tuple(v.shape):
            return (f"{whose} {what}: {file_name(src[k])} has shape {list(sd[src[k]].shape)}, "
                    f"{built} wants {list(v.shape)}")
    model.load_state_dict({k: sd[src[k]] for k in want if src[k] in sd}, strict=False, assign=True)
    if any(src[k] not in sd for k in tied if k in want):
        model.tie_weights()
    return ""


def _arena_linears(encoder, arena_name, tensors: dict, watcher) -> int:
    """Replace every nn.Linear of encoder whose weight the arena holds (bitsandbytes 4-bit, or a
    plain 2-D F32/F16/BF16/F8 one) by an ArenaNF4Linear over it, so that LoRA side factors the
    host binds to it, and bytes a fused apply rewrites, are used from the next encode; returns
    how many."""
    import torch

    from arenahost import torch as at
    from arenahost.diffusers_flux import _set_module

    built = []
    for n, mod in list(encoder.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = arena_name(n) + ".weight"
        d = tensors.get(w)
        if d is None or not (d.HasField("quant") or len(d.shape) == 2):
            continue
        b = arena_name(n) + ".bias"
        # cache_weight=False: an encoder runs once per prompt, so its weights are read from the
        # arena then (dequantized or widened one layer at a time) rather than kept in fp32.
        new = at.ArenaNF4Linear(watcher, w, b if mod.bias is not None and b in tensors else None, mod.in_features,
                                mod.out_features, cache_weight=False)
        # transformers reads a Linear's weight dtype in places (T5's wo): an empty stand-in says it.
        new.register_buffer("weight", torch.empty(0, dtype=mod.weight.dtype), persistent=False)
        built.append((n, new))
    if not built:
        return 0
    watcher.poll()
    for n, new in built:
        new._sync()
        _set_module(encoder, n, new)

    def _pre(_mod, _args, _kwargs=None):
        watcher.poll()
    encoder.register_forward_pre_hook(_pre)
    return len(built)


def _empty(cls_build):
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return cls_build()
    with init_empty_weights():
        return cls_build()


def build_bundled_pipeline(host, model: str = "", *, tokenizer_dirs=(), dtype=None, mapper=None, folder: str = ""):
    """A FluxPipeline for a bundled single file in the arena (see the module doc).

    folder: the model is a diffusers pipeline folder whose text encoders and
    VAE the host carries in the arena beside its transformer, under the same
    prefixes (``text_encoder/`` as CLIP-L, ``text_encoder_2/`` as T5,
    ``vae/``): configs, tokenizers and the scheduler come from the folder,
    the weights from the arena. A part the arena does not carry (the host
    leaves out a component without safetensors weights) is loaded from the
    folder with ``from_pretrained`` (safetensors only), and
    ``_arenahost_components`` says so.

    The transformer is built empty (0-element Linear weights) for
    :func:`~arenahost.diffusers_flux.patch_pipeline`; the pipeline's
    ``_arenahost_components`` lists where each part came from.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from arenahost.diffusers_flux import _logical_shape, detect_layout
    from arenahost.tensor import default_mapper

    dtype = dtype or torch.float32
    m = mapper if mapper is not None else default_mapper()
    resp = host.lookup_tensors(model=model, prefix="")
    tensors = {d.name: d for d in resp.tensors}
    if not tensors:
        raise DescriptorError(f"model {model!r}: the host lists no tensors")
    comps = bundled_components(tensors)
    whose = f"pipeline folder {folder}'s" if folder else "bundled"
    tok_dir, tok_why = find_tokenizers(((folder,) if folder else ()) + tuple(tokenizer_dirs),
                                       f"pipeline folder {folder}" if folder else "a bundled single file")
    cfg_dir = folder or tok_dir or next((d for d in tokenizer_dirs if d and os.path.isdir(d)), "")
    sources = {}

    def cfg_path(sub):
        p = os.path.join(cfg_dir, sub, "config.json") if cfg_dir else ""
        return p if p and os.path.isfile(p) else ""

    def file_name(sub, prefix, inner=""):
        # a tensor's name where the user can find it: the single file's key, or the folder's file and key
        if folder:
            return lambda k: f"{os.path.join(folder, sub)}/ tensor {inner + k}"
        return lambda k: prefix + inner + k

    # Transformer: config from the folder or the shapes; weights patched from the arena later.
    layout, prefix = detect_layout(tensors)
    tcfg = _folder_config(cfg_dir, "transformer")
    if tcfg is None:
        shapes = {k[len(prefix):]: _logical_shape(d) for k, d in tensors.items() if k.startswith(prefix) and not _is_side(k)}
        tcfg = flux_config_from_shapes(shapes, layout)
        sources["transformer_config"] = "inferred from the tensors' shapes"
    else:
        sources["transformer_config"] = os.path.join(cfg_dir, "transformer", "config.json")
    tcfg = {k: v for k, v in tcfg.items() if not k.startswith("_") and k != "quantization_config"}
    tr = _empty(lambda: FluxTransformer2DModel.from_config(tcfg))
    for mod in tr.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    tr = tr.to_empty(device="cpu").to(dtype).eval()

    # Text encoders: both, complete, and tokenizers, or none.
    parts = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    why = ""
    if ("te1" not in comps or "t5" not in comps) and folder:
        from arenahost.diffusers_flux import folder_text_components

        has, why = folder_text_components(folder)
        if has and not tok_why:
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

            # Not in the arena (the host carries only safetensors components): the folder's own, once per process.
            kw = dict(torch_dtype=dtype, local_files_only=True, use_safetensors=True)
            parts = dict(text_encoder=CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **kw).eval(),
                         text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw).eval(),
                         tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
                         tokenizer_2=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"), local_files_only=True))
            sources["text_encoders"] = (f"from_pretrained ({os.path.join(folder, 'text_encoder')}, "
                                        f"{os.path.join(folder, 'text_encoder_2')}): the arena model carries no "
                                        + " and no ".join(k for k in ("te1", "t5") if k not in comps))
        elif has:
            why = tok_why
    elif "te1" not in comps or "t5" not in comps:
        missing = [lbl for k, lbl in (("te1", "CLIP-L (text_encoders.clip_l.)"), ("t5", "T5 (text_encoders.t5xxl.)")) if k not in comps]
        why = "the single file bundles no " + " and no ".join(missing)
    elif tok_why:
        why = tok_why
    else:
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        clip_sd = {k.removeprefix("text_model."): v for k, v in _arena_state(tensors, CLIP_PREFIX, m, dtype, lazy=True).items()}
        # Single files and transformers 4 name CLIP's tensors text_model.…; transformers 5's
        # save_pretrained (a folder's text_encoder/) writes them without it.
        clip_inner = "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in tensors) else ""
        t5_sd = _arena_state(tensors, T5_PREFIX, m, dtype, lazy=True)
        try:
            c1 = _folder_config(cfg_dir, "text_encoder")
            c1 = CLIPTextConfig(**{k: v for k, v in c1.items() if not k.startswith("_")}) if c1 else CLIPTextConfig(**clip_config_from_state(clip_sd))
            c2 = _folder_config(cfg_dir, "text_encoder_2")
            c2 = T5Config(**{k: v for k, v in c2.items() if not k.startswith("_")}) if c2 else T5Config(**t5_config_from_state(t5_sd))
        except KeyError as e:
            why = f"{whose} text encoder is incomplete: no {e.args[0]} to read its config from (CLIP-L names without text_model.)"
        else:
            te1 = _empty(lambda: CLIPTextModel(c1))
            te2 = _empty(lambda: T5EncoderModel(c2))
            strict = bool(folder)
            why = (_load(te1, clip_sd, "CLIP-L", file_name("text_encoder", CLIP_PREFIX, clip_inner), whose=whose,
                         config=cfg_path("text_encoder"), strict_extra=strict)
                   or _load(te2, t5_sd, "T5", file_name("text_encoder_2", T5_PREFIX), whose=whose, config=cfg_path("text_encoder_2"),
                            tied=("encoder.embed_tokens.weight", "shared.weight"), strict_extra=strict))
            if not why:
                from arenahost import torch as at

                # Encoder Linear layers read the arena on every encode: LoRA side factors the host
                # binds and fused bytes (on 4-bit and on plain F16/F8 encoders alike) apply.
                watcher = at.FactorWatcher(host, model, mapper=m)
                clip_name = lambda n: CLIP_PREFIX + clip_inner + n.removeprefix("text_model.")  # noqa: E731
                n = _arena_linears(te1, clip_name, tensors, watcher)
                n += _arena_linears(te2, lambda n: T5_PREFIX + n, tensors, watcher)
                # The other 2-D weights (token and position embeddings, T5's shared table and
                # relative-attention bias) were left on the meta device: read them now.
                miss = _materialize(te1, lambda k: clip_name(k.removeprefix("text_model.")), tensors, m, dtype) or \
                    _materialize(te2, lambda k: T5_PREFIX + ("shared.weight" if k == "encoder.embed_tokens.weight" else k), tensors, m, dtype)
                if miss:
                    raise ValueError(f"bundled text encoder: {miss}")
                te2.tie_weights()
                if n:
                    sources["text_encoder_layers"] = f"{n} Linear layers read from the arena on every encode (LoRAs apply)"
                parts = dict(text_encoder=te1.to(dtype).eval(), text_encoder_2=te2.to(dtype).eval(),
                             tokenizer=AutoTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer"), local_files_only=True),
                             tokenizer_2=AutoTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer_2"), local_files_only=True))
                sources["text_encoders"] = (f"arena ({CLIP_PREFIX}, {T5_PREFIX}"
                                            + (f": {os.path.join(folder, 'text_encoder')}, {os.path.join(folder, 'text_encoder_2')}" if folder else "")
                                            + f"); configs from {cfg_path('text_encoder') or 'the tensors'}, "
                                            f"{cfg_path('text_encoder_2') or 'the tensors'}; tokenizers from {tok_dir}")

    # VAE: the bundled one when complete, else a small random one (and say so).
    vae, vae_why = None, ""
    if "vae" not in comps and folder and os.path.isdir(os.path.join(folder, "vae")):
        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=dtype, local_files_only=True,
                                            use_safetensors=True).eval()
        sources["vae"] = f"from_pretrained ({os.path.join(folder, 'vae')}): the arena model carries no VAE"
    elif "vae" not in comps:
        vae_why = ("the arena model carries no VAE (vae.) and the folder has no vae/" if folder else
                   "the single file bundles no VAE (vae. / first_stage_model.)")
    else:
        sd = _arena_state(tensors, comps["vae"], m, dtype)
        if any(k.startswith("encoder.down.") for k in sd):
            sd = _ldm_vae_to_diffusers(sd)
        try:
            vcfg = _folder_config(cfg_dir, "vae")
            vcfg = {k: v for k, v in vcfg.items() if not k.startswith("_")} if vcfg else vae_config_from_state(sd)
        except KeyError as e:
            vae_why = f"{whose} VAE is incomplete: no {e.args[0]} to read its config from"
        else:
            v = _empty(lambda: AutoencoderKL.from_config(vcfg))
            vae_why = _load(v, sd, "VAE", file_name("vae", comps["vae"]), whose=whose, config=cfg_path("vae"), strict_extra=bool(folder))
            if not vae_why:
                vae = v.to(dtype).eval()
                sources["vae"] = f"arena ({comps['vae']}" + (f": {os.path.join(folder, 'vae')}" if folder else "") + ")"
    if vae is None:
        from arenahost.diffusers_flux import build_small_pipeline

        vae = build_small_pipeline(None, dtype=dtype).vae

    sched_dir = os.path.join(cfg_dir, "scheduler") if cfg_dir else ""
    if sched_dir and os.path.isdir(sched_dir):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sched_dir, local_files_only=True)
    elif tcfg.get("guidance_embeds", True):  # FLUX.1-dev's settings
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=tr, **parts)
    pipe._arenahost_conditioning = ("text_encoders", "") if parts["text_encoder"] is not None else ("stand-in", why)
    pipe._arenahost_decoder = ("vae", "") if not vae_why else ("stand-in", vae_why + ": a small random VAE decodes")
    pipe._arenahost_empty_transformer = True
    pipe._arenahost_components = sources
    return pipe


