"""Oracle for diffusers folders: real diffusers models (the Flux family, FLUX.2, SDXL's UNet, SD3.5), bitsandbytes NF4, PEFT LoRAs.

usage:
  flux_family.py make OUT_DIR   for each family (flux-dev, flux-schnell-pruned, flux-fill, chroma, flux2, sdxl, sd35;
                                env FAMILIES=a,b for a subset):
      OUT_DIR/FAMILY/nf4/            save_pretrained of the bnb-NF4 model (one file)
      OUT_DIR/FAMILY/nf4-sharded/    the same with max_shard_size="150KB" (index + shards)
      OUT_DIR/FAMILY/pipeline/       model_index.json + transformer/ or unet/ (the sharded folder)
      OUT_DIR/FAMILY/lora.safetensors  a PEFT LoRA on every Linear, diffusers keys ("transformer.…", "unet.…")
      OUT_DIR/FAMILY/peft-merged.safetensors  {weight: packed codes} after PEFT's merge() on the bnb model
  flux_family.py load DIR:CLASS...  loads each DIR with CLASS.from_pretrained (pre-quantized, CPU) and
      prints one JSON line per DIR: the Linear4bit count and how many of their packed codes equal the
      folder's bytes.

Each model is the real diffusers class with a tiny config (hidden 128, every Linear input width a
multiple of 64) and seeded weights, quantized by diffusers' BitsAndBytesConfig on the
CPU. diffusers 0.42.1 refuses bitsandbytes without a GPU in validate_environment (the quantization
itself runs on the CPU), so that check is skipped here, and device_map={"": "cpu"} keeps it from
asking CUDA for a device. No bitsandbytes forward runs before codes are read (on AVX512-BF16 CPUs
the first CPU forward repacks the weights). PEFT's merge() dequantizes with bitsandbytes' CPU
dequantize_4bit, which agrees with code[idx]·absmax at blocksize 64 and widths that are multiples
of 64, the shapes used here.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from diffusers import (BitsAndBytesConfig, ChromaPipeline, ChromaTransformer2DModel, Flux2Pipeline,  # noqa: E402
                       Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.quantizers.bitsandbytes import bnb_quantizer  # noqa: E402

bnb_quantizer.BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None

FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=True,
            axes_dims_rope=(8, 28, 28))
# SDXL's UNet at a tiny width: SDXL's three levels (attention at the second and third), two layers per
# block, the text_time add_embedding, linear projections.
SDXL = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
            attention_head_dim=(2, 2, 2), transformer_layers_per_block=1, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=128)
# SD3.5's MMDiT: dual attention in the first block, RMS QK-norm.
SD35 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128, out_channels=16,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
FLUX2 = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
             joint_attention_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(16, 16, 16, 16))
# name: (model class, config, pipeline whose save_lora_weights writes the LoRA, component)
FAMILIES = {
    "flux-dev": (FluxTransformer2DModel, FLUX, FluxPipeline, "transformer"),
    "flux-schnell-pruned": (FluxTransformer2DModel, dict(FLUX, guidance_embeds=False, num_layers=1), FluxPipeline, "transformer"),
    "flux-fill": (FluxTransformer2DModel, dict(FLUX, in_channels=384, out_channels=64), FluxPipeline, "transformer"),
    "chroma": (ChromaTransformer2DModel, dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                              attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                                              axes_dims_rope=(8, 28, 28), approximator_num_channels=64,
                                              approximator_hidden_dim=128, approximator_layers=2), ChromaPipeline, "transformer"),
    "flux2": (Flux2Transformer2DModel, FLUX2, Flux2Pipeline, "transformer"),
    "sdxl": (UNet2DConditionModel, SDXL, StableDiffusionXLPipeline, "unet"),
    "sd35": (SD3Transformer2DModel, SD35, StableDiffusion3Pipeline, "transformer"),
}
CLASSES = {c.__name__: c for c, _, _, _ in FAMILIES.values()}


def quantized(cls, path):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return cls.from_pretrained(path, quantization_config=cfg, torch_dtype=torch.bfloat16, device_map={"": "cpu"})


def make(out):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    only = set(os.environ.get("FAMILIES", "").split(",")) - {""}
    for i, (name, (cls, cfg, pipe_cls, component)) in enumerate(FAMILIES.items()):
        if only and name not in only:
            continue
        d = os.path.join(out, name)
        torch.manual_seed(100 + i)
        m = cls(**cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.05)
        m.save_pretrained(os.path.join(d, "fp32"))
        q = quantized(cls, os.path.join(d, "fp32"))
        q.save_pretrained(os.path.join(d, "nf4"))
        q.save_pretrained(os.path.join(d, "nf4-sharded"), max_shard_size="150KB")
        shutil.copytree(os.path.join(d, "nf4-sharded"), os.path.join(d, "pipeline", component))
        with open(os.path.join(d, "pipeline", "model_index.json"), "w") as f:
            json.dump({"_class_name": pipe_cls.__name__, "_diffusers_version": "0.42.1", component: ["diffusers", cls.__name__]}, f)
        shutil.rmtree(os.path.join(d, "fp32"))

        targets = [n for n, mod in q.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
        q.is_loaded_in_4bit = True  # PEFT wraps Linear4bit in its bnb LoRA layer only on a 4-bit model
        q.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="default")
        with torch.no_grad():
            for n, p in q.named_parameters():
                if "lora_" in n:
                    # fp32 factors, as a LoRA file holds them: on the bf16 model PEFT made them
                    # bf16, and its merge would then add a bf16 delta and re-quantize bf16 sums.
                    p.data = torch.randn(p.shape, dtype=torch.float32) * 0.05
        # Saved the way a pipeline does: keys "transformer.…" or "unet.…", the
        # PEFT config (lora_alpha/r = 2) in the lora_adapter_metadata header.
        sd = {k: v.float().contiguous() for k, v in get_peft_model_state_dict(q, adapter_name="default").items()}
        pipe_cls.save_lora_weights(d, weight_name="lora.safetensors", **{
            component + "_lora_layers": sd, component + "_lora_adapter_metadata": q.peft_config["default"].to_dict()})
        merged = {}
        for n in targets:
            lm = q.get_submodule(n)
            assert type(lm).__module__ == "peft.tuners.lora.bnb", (n, type(lm))
            lm.merge()
            merged[n + ".weight"] = lm.get_base_layer().weight.data.clone().contiguous()
        save_file(merged, os.path.join(d, "peft-merged.safetensors"))
        print(f"{name}: {len(targets)} Linear4bit layers, LoRA on each, PEFT-merged codes written")


def load(path, cls_name):
    import bitsandbytes as bnb
    from safetensors import safe_open

    cls = CLASSES[cls_name]
    m = cls.from_pretrained(path, torch_dtype=torch.bfloat16, device_map={"": "cpu"})
    files = {}
    idx = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(idx):
        wm = json.load(open(idx))["weight_map"]
    else:
        wm = None
    n = same = 0
    for name, mod in m.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        n += 1
        key = name + ".weight"
        fn = wm[key] if wm else "diffusion_pytorch_model.safetensors"
        if fn not in files:
            files[fn] = safe_open(os.path.join(path, fn), "pt")
        stored = files[fn].get_tensor(key)
        if torch.equal(stored.reshape(-1), mod.weight.data.reshape(-1)):
            same += 1
    print(json.dumps({"dir": path, "class": type(m).__name__, "linear4bit": n, "codes_equal": same}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        for arg in sys.argv[2:]:
            path, cls_name = arg.rsplit(":", 1)
            load(path, cls_name)
