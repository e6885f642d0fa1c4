"""Oracle for the Flux family in diffusers folders: real diffusers models, bitsandbytes NF4, PEFT LoRAs.

usage:
  flux_family.py make OUT_DIR   for each family (flux-dev, flux-schnell-pruned, flux-fill, chroma):
      OUT_DIR/FAMILY/nf4/            save_pretrained of the bnb-NF4 model (one file)
      OUT_DIR/FAMILY/nf4-sharded/    the same with max_shard_size="150KB" (index + shards)
      OUT_DIR/FAMILY/pipeline/       model_index.json + transformer/ (the sharded folder)
      OUT_DIR/FAMILY/lora.safetensors  a PEFT LoRA on every Linear, diffusers keys ("transformer.…")
      OUT_DIR/FAMILY/peft-merged.safetensors  {weight: packed codes} after PEFT's merge() on the bnb model
  flux_family.py load DIR:CLASS...  loads each DIR with CLASS.from_pretrained (pre-quantized, CPU) and
      prints one JSON line per DIR: the Linear4bit count and how many of their packed codes equal the
      folder's bytes.

Each model is the real diffusers class with a tiny config (hidden 128 = 2 heads of 64, every Linear
input width a multiple of 64) and seeded weights, quantized by diffusers' BitsAndBytesConfig on the
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
from diffusers import (BitsAndBytesConfig, ChromaPipeline, ChromaTransformer2DModel, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel)
from diffusers.quantizers.bitsandbytes import bnb_quantizer  # noqa: E402

bnb_quantizer.BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None

FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=True,
            axes_dims_rope=(8, 28, 28))
FAMILIES = {
    "flux-dev": (FluxTransformer2DModel, FLUX),
    "flux-schnell-pruned": (FluxTransformer2DModel, dict(FLUX, guidance_embeds=False, num_layers=1)),
    "flux-fill": (FluxTransformer2DModel, dict(FLUX, in_channels=384, out_channels=64)),
    "chroma": (ChromaTransformer2DModel, dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                              attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                                              axes_dims_rope=(8, 28, 28), approximator_num_channels=64,
                                              approximator_hidden_dim=128, approximator_layers=2)),
}


def quantized(cls, path):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return cls.from_pretrained(path, quantization_config=cfg, torch_dtype=torch.bfloat16, device_map={"": "cpu"})


def make(out):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    for i, (name, (cls, cfg)) in enumerate(FAMILIES.items()):
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
        shutil.copytree(os.path.join(d, "nf4-sharded"), os.path.join(d, "pipeline", "transformer"))
        with open(os.path.join(d, "pipeline", "model_index.json"), "w") as f:
            pipe = "ChromaPipeline" if name == "chroma" else "FluxPipeline"
            json.dump({"_class_name": pipe, "_diffusers_version": "0.42.1", "transformer": ["diffusers", cls.__name__]}, f)
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
        # Saved the way a pipeline does: keys "transformer.…", the PEFT
        # config (lora_alpha/r = 2) in the lora_adapter_metadata header.
        pipe_cls = ChromaPipeline if name == "chroma" else FluxPipeline
        sd = {k: v.float().contiguous() for k, v in get_peft_model_state_dict(q, adapter_name="default").items()}
        pipe_cls.save_lora_weights(d, transformer_lora_layers=sd, weight_name="lora.safetensors",
                                   transformer_lora_adapter_metadata=q.peft_config["default"].to_dict())
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

    cls = {"FluxTransformer2DModel": FluxTransformer2DModel, "ChromaTransformer2DModel": ChromaTransformer2DModel}[cls_name]
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
