"""Cross-check helpers shared by the tests and ``bench/pipeline`` (torch, diffusers, peft, bitsandbytes).

Nothing in the product imports this module. It reads a bitsandbytes-NF4
safetensors checkpoint (the layout ``arenahost sample`` writes), gives the
weights to bitsandbytes and diffusers *independently* of
:mod:`arenahost.diffusers_flux` (its own BFL → diffusers conversion, bnb's own
``dequantize_4bit``), writes test LoRAs in two real formats (PEFT keys saved
by ``FluxPipeline.save_lora_weights``, kohya keys on BFL names), and computes
side factors from LoRA files in Python (the "fake host" path used where the
host's apply route is not available).
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = [
    "read_nf4_checkpoint",
    "bnb_quant_state",
    "dequantized_bfl_state",
    "bfl_to_diffusers_state",
    "plain_transformer",
    "write_peft_lora",
    "write_kohya_lora",
    "side_factors_from_files",
    "KOHYA_TARGETS",
    "arena_descriptors",
    "flux_inputs",
    "PEFT_TARGETS",
    "TINY_PIPELINE_TRANSFORMER",
    "write_tiny_flux_pipeline",
]

QS_SUFFIX = ".quant_state.bitsandbytes__nf4"


def read_nf4_checkpoint(path: str) -> dict:
    """{tensor name: torch tensor} of a safetensors file (bnb's serialized keys kept as they are)."""
    from safetensors.torch import load_file

    return load_file(path)


def bnb_quant_state(sd: dict, weight: str):
    """bitsandbytes' own QuantState for `weight` ("img_in.weight") from its serialized keys."""
    import bitsandbytes.functional as F

    qs = {k[len(weight) + 1 :]: v for k, v in sd.items() if k.startswith(weight + ".")}
    if "quant_state.bitsandbytes__nf4" not in qs:
        raise KeyError(f"{weight}: no {weight}{QS_SUFFIX}")
    return F.QuantState.from_dict(qs, device="cpu")


def quant_weights(sd: dict) -> list[str]:
    return sorted(k[: -len(QS_SUFFIX)] for k in sd if k.endswith(QS_SUFFIX))


def dequantized_bfl_state(sd: dict) -> dict:
    """fp32 state dict in the checkpoint's names: weights dequantized by bitsandbytes itself."""
    import bitsandbytes.functional as F
    import torch

    out = {}
    qw = set(quant_weights(sd))
    for w in qw:
        st = bnb_quant_state(sd, w)
        out[w] = F.dequantize_4bit(sd[w], st).to(torch.float32)
    for k, v in sd.items():
        if k in qw or any(k.startswith(w + ".") for w in qw):
            continue
        out[k] = v.to(torch.float32)
    return out


def bfl_to_diffusers_state(bfl: dict, prefix: str = "") -> dict:
    """BFL Flux state dict -> diffusers FluxTransformer2DModel state dict (split sizes from the shapes)."""
    import torch

    s = {k[len(prefix):]: v for k, v in bfl.items() if k.startswith(prefix)}
    h = s["img_in.weight"].shape[0]
    out = {}

    def put(d, b, rows=None):
        for suf in ("weight", "bias"):
            t = s[f"{b}.{suf}"]
            out[f"{d}.{suf}"] = t if rows is None else t[rows[0] : rows[1]]

    def fused(parts, b, sizes):
        off = 0
        for d, n in zip(parts, sizes):
            put(d, b, (off, off + n))
            off += n

    put("x_embedder", "img_in")
    put("context_embedder", "txt_in")
    for a, b in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        if f"{b}.in_layer.weight" in s:
            put(f"time_text_embed.{a}.linear_1", f"{b}.in_layer")
            put(f"time_text_embed.{a}.linear_2", f"{b}.out_layer")
    nd = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("double_blocks."))
    ns = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("single_blocks."))
    for i in range(nd):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        put(d + "norm1.linear", b + "img_mod.lin")
        put(d + "norm1_context.linear", b + "txt_mod.lin")
        fused([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], b + "img_attn.qkv", [h] * 3)
        fused([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], b + "txt_attn.qkv", [h] * 3)
        put(d + "attn.to_out.0", b + "img_attn.proj")
        put(d + "attn.to_add_out", b + "txt_attn.proj")
        put(d + "ff.net.0.proj", b + "img_mlp.0")
        put(d + "ff.net.2", b + "img_mlp.2")
        put(d + "ff_context.net.0.proj", b + "txt_mlp.0")
        put(d + "ff_context.net.2", b + "txt_mlp.2")
        out[d + "attn.norm_q.weight"] = s[b + "img_attn.norm.query_norm.scale"]
        out[d + "attn.norm_k.weight"] = s[b + "img_attn.norm.key_norm.scale"]
        out[d + "attn.norm_added_q.weight"] = s[b + "txt_attn.norm.query_norm.scale"]
        out[d + "attn.norm_added_k.weight"] = s[b + "txt_attn.norm.key_norm.scale"]
    for i in range(ns):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        m = s[b + "linear1.weight"].shape[0] - 3 * h
        fused([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], b + "linear1", [h, h, h, m])
        put(d + "proj_out", b + "linear2")
        put(d + "norm.linear", b + "modulation.lin")
        out[d + "attn.norm_q.weight"] = s[b + "norm.query_norm.scale"]
        out[d + "attn.norm_k.weight"] = s[b + "norm.key_norm.scale"]
    put("proj_out", "final_layer.linear")
    for suf in ("weight", "bias"):
        shift, scale = s[f"final_layer.adaLN_modulation.1.{suf}"].chunk(2, dim=0)
        out[f"norm_out.linear.{suf}"] = torch.cat([scale, shift], dim=0)
    return out


def plain_transformer(diffusers_state: dict, config: dict):
    """A FluxTransformer2DModel (fp32, eval) holding exactly these weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(**config).float().eval()
    missing, unexpected = m.load_state_dict(diffusers_state, strict=False)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the transformer: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return m


# LoRA targets: the PEFT LoRA names diffusers modules (split parts included);
# the kohya one names BFL layers that diffusers' converter maps at any width
# (it hard-codes FLUX.1's 3072/12288 split of single_blocks.N.linear1, so
# linear1 is covered by the PEFT LoRA's to_q/to_k/to_v/proj_mlp instead).
# Top-level kohya modules (img_in, txt_in, final_layer_adaLN_modulation_1)
# are left out too: diffusers 0.42.1's converter writes them without the
# "transformer." prefix and load_lora_weights then drops them silently, so
# diffusers would not be the oracle there (the PEFT LoRA covers x_embedder
# and norm_out.linear, the swapped-halves layer).
PEFT_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_v_proj", "to_out.0", "proj_mlp", "proj_out", "ff.net.2",
                "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder"]
KOHYA_TARGETS = ["double_blocks_{i}_img_attn_qkv", "double_blocks_{i}_txt_attn_qkv", "double_blocks_{i}_img_attn_proj",
                 "double_blocks_{i}_img_mlp_0", "double_blocks_{i}_txt_mlp_2", "double_blocks_{i}_img_mod_lin",
                 "single_blocks_{j}_linear2", "single_blocks_{j}_modulation_lin"]


def write_peft_lora(path: str, diffusers_state: dict, config: dict, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, std: float = 0.05) -> str:
    """A PEFT LoRA saved the way a pipeline saves it (``transformer.`` keys, config in the metadata)."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    m = plain_transformer(diffusers_state, config)
    m.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=False), adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    d, name = os.path.split(path)
    FluxPipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(m, adapter_name="default"),
                                   transformer_lora_adapter_metadata=m.peft_config["default"].to_dict(), weight_name=name)
    return path


def write_kohya_lora(path: str, bfl_state: dict, *, rank: int = 4, alpha: float = 2.0, seed: int = 1, std: float = 0.05,
                     targets=None) -> str:
    """A kohya sd-scripts Flux LoRA (``lora_unet_…`` BFL names, lora_down/lora_up/alpha) in bf16.

    targets: kohya stems ("double_blocks_{i}_img_attn_qkv"; {i} runs over
    double blocks, {j} over single blocks); default KOHYA_TARGETS.
    """
    import torch
    from safetensors.torch import save_file

    nd = 1 + max(int(k.split(".")[1]) for k in bfl_state if k.startswith("double_blocks."))
    ns = 1 + max(int(k.split(".")[1]) for k in bfl_state if k.startswith("single_blocks."))
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = []
    for t in (KOHYA_TARGETS if targets is None else targets):
        if "{i}" in t:
            names += [t.format(i=i) for i in range(nd)]
        elif "{j}" in t:
            names += [t.format(j=j) for j in range(ns)]
        else:
            names.append(t)
    for k in names:
        bfl = k.replace("_", ".")
        # kohya joins the BFL path with "_"; undo it against the real names.
        cands = [n[: -len(".weight")] for n in bfl_state if n.endswith(".weight") and n[: -len(".weight")].replace(".", "_") == k]
        if len(cands) != 1:
            raise KeyError(f"kohya key {k}: {len(cands)} BFL layers match ({bfl})")
        w = bfl_state[cands[0] + ".weight"]
        out[f"lora_unet_{k}.lora_down.weight"] = (torch.randn(rank, w.shape[1], generator=g) * std).to(torch.bfloat16)
        out[f"lora_unet_{k}.lora_up.weight"] = (torch.randn(w.shape[0], rank, generator=g) * std).to(torch.bfloat16)
        out[f"lora_unet_{k}.alpha"] = torch.tensor(float(alpha), dtype=torch.bfloat16)
    save_file(out, path, metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return path


def _peft_modules(path: str) -> dict[str, tuple]:
    """diffusers module -> (A [r, in], B [out, r], scale) of a PEFT-keyed file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
    r = cfg.get("transformer.r", cfg.get("r"))
    alpha = cfg.get("transformer.lora_alpha", cfg.get("lora_alpha"))
    scale = float(alpha) / float(r) if r and alpha else 1.0
    out = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            mod = k[: -len(".lora_A.weight")].removeprefix("transformer.")
            out[mod] = (a, sd[k.replace("lora_A", "lora_B")], scale)
    return out


def _kohya_modules(path: str) -> dict[str, tuple]:
    """kohya key stem -> (down [r, in], up [out, r], alpha/rank)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    out = {}
    for k, down in sd.items():
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else float(down.shape[0])
            out[stem.removeprefix("lora_unet_")] = (down, sd[stem + ".lora_up.weight"], alpha / down.shape[0])
    return out


def side_factors_from_files(loras, transformer_config: dict, bfl_weights: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """A_cat [R × in] and B_cat [out × R] per BFL weight name, strength·scale folded into B_cat.

    loras: [(path, kind "peft"|"kohya", strength)]; bfl_weights: BFL weight
    name -> (out, in). The same rule the LoRA engine applies in side mode: a
    diffusers split part's B lands in its rows of the fused layer (the other
    rows zero), norm_out.linear's halves are swapped back to BFL order.
    """
    import torch

    from arenahost.diffusers_flux import flux_layer_map

    lmap = flux_layer_map(transformer_config, "flux-bfl")
    parts: dict[str, list] = {}
    for path, kind, strength in loras:
        if kind == "peft":
            for mod, (a, b, scale) in _peft_modules(path).items():
                if mod not in lmap:
                    raise KeyError(f"{path}: module {mod} has no BFL layer")
                src, rows = lmap[mod]
                w = src + ".weight"
                out_f = bfl_weights[w][0]
                bb = torch.zeros(out_f, a.shape[0])
                segs = rows or [(0, out_f)]
                off = 0
                for s, c in segs:
                    bb[s : s + c] = b[off : off + c]
                    off += c
                parts.setdefault(w, []).append((a, bb * (strength * scale)))
        elif kind == "kohya":
            names = {w[: -len(".weight")].replace(".", "_"): w for w in bfl_weights}
            for stem, (down, up, scale) in _kohya_modules(path).items():
                w = names.get(stem)
                if w is None:
                    raise KeyError(f"{path}: kohya module {stem} has no BFL layer")
                parts.setdefault(w, []).append((down, up * (strength * scale)))
        else:
            raise ValueError(f"{path}: kind {kind!r}, want peft or kohya")
    return {w: (torch.cat([a for a, _ in ps], 0).contiguous(), torch.cat([b for _, b in ps], 1).contiguous()) for w, ps in parts.items()}


def arena_descriptors(arena, sd: dict, model: str = "sample") -> dict:
    """Descriptors of a bnb-NF4 checkpoint copied into `arena` (an object with
    ``put(name, ndarray, wire_dtype=None)`` and ``ref(name, ndarray, wire_dtype=None)``,
    as the SDK tests' memfd Arena), the way the host's registry describes them:
    packed bytes with QuantInfo (absmax, quant_map, nested state), other
    tensors in their stored dtype (bf16 as BF16)."""
    import torch

    from arenahost.plugin.v1 import plugin_pb2 as pb

    def np_of(t):
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16), pb.DTYPE_BF16
        return t.contiguous().numpy(), None

    wire = {torch.bfloat16: pb.DTYPE_BF16, torch.float16: pb.DTYPE_F16, torch.float32: pb.DTYPE_F32}
    out = {}
    qw = set(quant_weights(sd))
    for w in sorted(qw):
        st = bnb_quant_state(sd, w)
        d = arena.put(w, sd[w].contiguous().numpy().reshape(-1, 1))
        d.model = model
        qi = pb.QuantInfo(quant_type=st.quant_type, blocksize=st.blocksize, dtype=wire[st.dtype], shape=list(st.shape),
                          nested=st.nested, storage_dtype=pb.DTYPE_U8,
                          quant_map=arena.ref(w + ".quant_map", st.code.float().numpy()))
        if st.nested:
            qi.absmax.CopyFrom(arena.ref(w + ".absmax", st.absmax.numpy()))
            qi.nested_blocksize = st.state2.blocksize
            qi.nested_offset = float(st.offset)
            qi.nested_absmax.CopyFrom(arena.ref(w + ".nested_absmax", st.state2.absmax.float().numpy()))
            qi.nested_quant_map.CopyFrom(arena.ref(w + ".nested_quant_map", st.state2.code.float().numpy()))
        else:
            qi.absmax.CopyFrom(arena.ref(w + ".absmax", st.absmax.float().numpy()))
        d.quant.CopyFrom(qi)
        out[w] = d
    for k, v in sd.items():
        if k in qw or any(k.startswith(w + ".") for w in qw):
            continue
        arr, wd = np_of(v)
        d = arena.put(k, arr, wire_dtype=wd)
        d.model = model
        out[k] = d
    return out


def flux_inputs(seed: int = 3, tokens: int = 64, txt: int = 16, in_channels: int = 64, context_dim: int = 4096, pooled_dim: int = 768):
    """Seeded FluxTransformer2DModel.forward inputs (the same on every machine: torch's CPU generator)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, context_dim, generator=g),
        pooled_projections=torch.randn(1, pooled_dim, generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )


# A tiny FLUX.1 transformer whose context/pooled widths match the tiny T5/CLIP
# of write_tiny_flux_pipeline (joint_attention_dim = T5 d_model, pooled = CLIP hidden).
TINY_PIPELINE_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
_TOKENIZER_TEXT = ["a red fox in the snow", "a blue boat on a calm lake", "portrait of an old man with a hat",
                   "a city at night with bright lights", "green hills under a grey sky"]


def _tiny_tokenizer(max_len: int):
    """A word-level tokenizer trained here from a few sentences (no download), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(_TOKENIZER_TEXT, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", t.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_len)


def nf4_state(module, *, blocksize: int = 64) -> dict:
    """The state dict bitsandbytes serializes for ``module`` with every nn.Linear weight
    quantized to NF4 on the CPU (``quantize_4bit``; keys ``W``, ``W.absmax``,
    ``W.quant_map``, ``W.quant_state.bitsandbytes__nf4``), other tensors as they are."""
    import bitsandbytes.functional as F
    import torch

    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = name + ".weight"
            packed, st = F.quantize_4bit(sd[w].float(), blocksize=blocksize, compress_statistics=False, quant_type="nf4")
            sd[w] = packed
            for k, v in st.as_dict(packed=True).items():
                sd[w + "." + k] = v
    return sd


# The same pipeline with the widths the released models' fixed rules give (what a
# single file cannot store and diffusers_bundled infers): CLIP heads 64 wide,
# T5 v1.1's gated GELU, the VAE's 32 GroupNorm groups, FLUX.1's RoPE split of
# the head width (d/8, 7d/16, 7d/16).
RELEASED_RULES_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14),
)


def write_tiny_flux_pipeline(out: str, *, seed: int = 0, text_encoders: bool = True, released_rules: bool = False) -> str:
    """A diffusers FluxPipeline folder built here with no download, as ``save_pretrained`` writes it.

    text_encoder/ (a tiny CLIPTextModel), text_encoder_2/ (a tiny T5EncoderModel),
    tokenizer/ and tokenizer_2/ (word-level tokenizers trained from a few
    sentences), vae/ (a tiny AutoencoderKL, scale factor 8), scheduler/ and
    transformer/ (TINY_PIPELINE_TRANSFORMER with its Linear weights in
    bitsandbytes NF4 and a config carrying diffusers' ``quantization_config``).
    diffusers' bnb quantizer needs a GPU, so the NF4 weights are written with
    bitsandbytes' own CPU ``quantize_4bit`` in bnb's serialized layout.
    text_encoders=False leaves the encoders and tokenizers out (null in model_index.json).
    released_rules=True builds every part with the widths the released models'
    fixed rules give (RELEASED_RULES_TRANSFORMER, a CLIP of one 64-wide head, a
    gated-GELU T5, a VAE of 32 channels in 32 groups), so that configs inferred
    from the tensors' shapes alone are exact. Returns out.
    """
    import torch
    from diffusers import AutoencoderKL, BitsAndBytesConfig, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = {}
        if text_encoders:
            t1, t2 = _tiny_tokenizer(77), _tiny_tokenizer(512)
            v = len(t1)
            parts = dict(
                tokenizer=t1, tokenizer_2=t2,
                text_encoder=CLIPTextModel(CLIPTextConfig(
                    vocab_size=v, hidden_size=64 if released_rules else 32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=1 if released_rules else 4, max_position_embeddings=77, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, projection_dim=32)).eval(),
                text_encoder_2=T5EncoderModel(T5Config(
                    vocab_size=v, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=37, pad_token_id=0,
                    eos_token_id=2, decoder_start_token_id=0,
                    feed_forward_proj="gated-gelu" if released_rules else "relu")).eval(),
            )
        else:
            parts = dict(tokenizer=None, tokenizer_2=None, text_encoder=None, text_encoder_2=None)
        torch.manual_seed(seed + 1)  # the same transformer with or without text encoders
        tr = FluxTransformer2DModel(**(RELEASED_RULES_TRANSFORMER if released_rules else TINY_PIPELINE_TRANSFORMER)).eval()
        # Non-trivial norm scales, so copying them from the arena is checked too.
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if n.endswith("norm_q.weight") or n.endswith("norm_k.weight") or "norm_added_" in n:
                    p.uniform_(0.5, 1.5)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32 if released_rules else 16,) * 4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=32 if released_rules else 8, sample_size=32, scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    FluxPipeline(scheduler=scheduler, vae=vae, transformer=tr, **parts).save_pretrained(out)
    tdir = os.path.join(out, "transformer")
    for f in os.listdir(tdir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(tdir, f))
    save_file(nf4_state(tr), os.path.join(tdir, "diffusion_pytorch_model.safetensors"))
    cfg_path = os.path.join(tdir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=torch.float32).to_dict()
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return out
