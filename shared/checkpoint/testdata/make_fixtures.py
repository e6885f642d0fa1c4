"""Writes the SDXL- and SD1.5-UNet and SD3.5-transformer fixtures of checkpoint's config tests.

usage: make_fixtures.py OUT_DIR   (run with .venv-torch; the JSON files are committed)

Each OUT_DIR/NAME.json is {"config": the config.json diffusers' save_pretrained writes,
"tensors": {name: shape}} of the real diffusers class at a tiny configuration: the names and
shapes a diffusers model folder of that family holds, without the weights.
"""
import json
import os
import sys

from diffusers import SD3Transformer2DModel, UNet2DConditionModel

MODELS = {
    # SDXL's structure (three levels, attention at the second and third, 2 transformer
    # layers at the third, text_time add_embedding, linear projections) at width 32.
    "sdxl": (UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
        attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 40)),
    # SD1.5's structure (four levels, attention at the first three, conv projections) at width 32.
    "sd15": (UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=40, attention_head_dim=8)),
    # SD3.5's MMDiT: dual attention in the first block, RMS QK-norm, the last block context_pre_only.
    "sd35": (SD3Transformer2DModel, dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=96, caption_projection_dim=64, pooled_projection_dim=48, out_channels=16,
        pos_embed_max_size=24, dual_attention_layers=(0,), qk_norm="rms_norm")),
}

out = sys.argv[1]
for name, (cls, cfg) in MODELS.items():
    m = cls(**cfg)
    config = json.loads(m.to_json_string())
    tensors = {k: list(v.shape) for k, v in m.state_dict().items()}
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"config": config, "tensors": tensors}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(name, len(tensors), "tensors")
