"""Oracle for shared/layout's UNet LDM <-> diffusers names: diffusers' own single-file converter.

Two small UNet2DConditionModel configs with the SD1.5 and SDXL block structure
(channels shrunk; names depend only on the structure):

  unet_ldm_oracle.py names OUT.json
      writes {"sd15": [param names], "sdxl": [param names]} (diffusers naming)
  unet_ldm_oracle.py convert IN.json OUT.json
      IN = {"sd15": {diffusers_name: ldm_name}, "sdxl": {...}} as shared/layout maps them.
      Builds an LDM checkpoint "model.diffusion_model.<ldm_name>" whose tensor i holds the
      value i, runs diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint, and
      writes {"sd15": {converted diffusers_name: i}, ...}.
"""
import json
import sys

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

CONFIGS = {
    "sd15": dict(sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=32, attention_head_dim=8),
    "sdxl": dict(sample_size=8, block_out_channels=(32, 32, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 2), cross_attention_dim=32, attention_head_dim=8,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32),
}


def model(kind):
    return UNet2DConditionModel(**CONFIGS[kind])


if sys.argv[1] == "names":
    out = {k: sorted(model(k).state_dict().keys()) for k in CONFIGS}
    json.dump(out, open(sys.argv[2], "w"), indent=0, sort_keys=True)
elif sys.argv[1] == "convert":
    mapping = json.load(open(sys.argv[2]))
    out = {}
    for kind, names in mapping.items():
        m = model(kind)
        sd = m.state_dict()
        ckpt, index = {}, {}
        for i, (diff, ldm) in enumerate(sorted(names.items())):
            ckpt["model.diffusion_model." + ldm] = torch.full_like(sd[diff], float(i))
        conv = convert_ldm_unet_checkpoint(ckpt, dict(m.config))
        out[kind] = {k: int(v.flatten()[0].item()) for k, v in conv.items()}
    json.dump(out, open(sys.argv[3], "w"), sort_keys=True)
else:
    sys.exit("usage: unet_ldm_oracle.py names OUT.json | convert IN.json OUT.json")
