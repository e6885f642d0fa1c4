"""Oracle for kohya's SD3 and SDXL LoRA keys: diffusers' own converters decide where each key lands.

  kohya_key_oracle.py layers OUT.json
      {"sd3": [[name, out, in], ...], "sdxl": [...]}: every nn.Linear of a tiny SD3.5
      SD3Transformer2DModel (3 blocks, dual attention in the first, RMS QK-norm, the last block
      context_pre_only) and of a tiny SDXL-structured UNet2DConditionModel, diffusers names.
  kohya_key_oracle.py sd3 IN.json OUT.json
      IN = {"pieces": [{"sai", "sai_row", "diff", "diff_row", "rows"}]}: where arenahost puts each
      row of each SAI (Stability) Linear. Builds an SAI checkpoint whose SAI weight row and bias row
      hold the id of the diffusers (layer, row) arenahost maps it to (every other SAI tensor the
      converter needs: pos_embed, x_embedder.proj, ln_q/ln_k, filled from the model), runs
      diffusers.loaders.single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers, and
      reports per diffusers Linear whether every row holds its own id. A SAI key the converter
      needs and arenahost lacks is reported as "missing", one it leaves unread as "leftover".
  kohya_key_oracle.py sdxl IN.json OUT.json
      IN = {diffusers_module: kohya_key} as arenahost maps them. Builds a kohya LoRA state dict
      (lora_down/lora_up/alpha, the module's id in its factors), converts it the way diffusers'
      StableDiffusionXLLoraLoaderMixin does (_maybe_map_sgm_blocks_to_diffusers with the UNet's
      config, _convert_non_diffusers_lora_to_diffusers, convert_unet_state_dict_to_peft) and
      writes {kohya_key: the diffusers module it became, or "error: …"}.
"""
import json
import sys

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32, num_attention_heads=2,
           joint_attention_dim=96, caption_projection_dim=64, pooled_projection_dim=48, out_channels=16,
           pos_embed_max_size=24, dual_attention_layers=(0,), qk_norm="rms_norm")
SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88)


def linears(m):
    return [[n, mod.out_features, mod.in_features] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]


def sd3(pieces):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    m = SD3Transformer2DModel(**SD3)
    sd = m.state_dict()
    lin = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    ids, nxt = {}, 1.0
    for n, mod in lin.items():
        ids[n] = torch.arange(nxt, nxt + mod.out_features)
        nxt += mod.out_features
    rows, ins = {}, {}
    for p in pieces:
        rows[p["sai"]] = max(rows.get(p["sai"], 0), p["sai_row"] + p["rows"])
        ins[p["sai"]] = lin[p["diff"]].in_features
    ck = {}
    for s, r in rows.items():
        ck[s + ".weight"] = torch.full((r, ins[s]), -1.0)
        ck[s + ".bias"] = torch.full((r,), -1.0)
    for p in pieces:
        v = ids[p["diff"]][p["diff_row"]:p["diff_row"] + p["rows"]]
        ck[p["sai"] + ".weight"][p["sai_row"]:p["sai_row"] + p["rows"]] = v[:, None]
        ck[p["sai"] + ".bias"][p["sai_row"]:p["sai_row"] + p["rows"]] = v
    # The tensors that are not Linear layers, under their SAI names (not what is tested).
    ck["pos_embed"] = sd["pos_embed.pos_embed"]
    ck["x_embedder.proj.weight"], ck["x_embedder.proj.bias"] = sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"]
    for i in range(SD3["num_layers"]):
        for sai, diff in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                          ("context_block.attn.ln_q", "attn.norm_added_q"), ("context_block.attn.ln_k", "attn.norm_added_k"),
                          ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            key = f"transformer_blocks.{i}.{diff}.weight"
            if key in sd:
                ck[f"joint_blocks.{i}.{sai}.weight"] = sd[key]
    ck = {"model.diffusion_model." + k: v for k, v in ck.items()}
    out = {"missing": [], "leftover": [], "wrong": [], "unconverted": [], "linears": 0, "rows": 0}
    try:
        conv = convert_sd3_transformer_checkpoint_to_diffusers(ck)
    except KeyError as e:
        out["missing"].append(str(e))
        return out
    out["leftover"] = sorted(ck)
    for n, v in ids.items():
        w, b = conv.get(n + ".weight"), conv.get(n + ".bias")
        if w is None:
            out["unconverted"].append(n)
            continue
        out["linears"] += 1
        out["rows"] += len(v)
        ok_w = torch.equal(w, v[:, None].expand_as(w))
        ok_b = b is None or torch.equal(b, v)
        if not (ok_w and ok_b):
            bad = (w[:, 0] != v).nonzero().flatten().tolist()
            out["wrong"].append({"layer": n, "rows_wrong": len(bad), "first_row": bad[:1], "bias_ok": ok_b})
    out["extra"] = sorted(k for k in conv if k not in sd)
    return out


def sdxl(mapping):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                          _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_unet_state_dict_to_peft

    m = UNet2DConditionModel(**SDXL)
    lin = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    out = {}
    for i, (diff, key) in enumerate(sorted(mapping.items())):
        mod = lin[diff]
        sd = {key + ".lora_down.weight": torch.full((1, mod.in_features), float(i)),
              key + ".lora_up.weight": torch.full((mod.out_features, 1), float(i)),
              key + ".alpha": torch.tensor(1.0)}
        try:
            sd = _maybe_map_sgm_blocks_to_diffusers(sd, m.config)
            conv, _ = _convert_non_diffusers_lora_to_diffusers(sd)
            conv = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in conv.items()})
            names = [k.removesuffix(".lora_A.weight") for k in conv if k.endswith(".lora_A.weight")]
            out[key] = names[0] if len(names) == 1 else "error: became %s" % sorted(conv)
        except Exception as e:  # noqa: BLE001 (a key diffusers cannot convert is reported, not raised)
            out[key] = "error: %s: %s" % (type(e).__name__, e)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "layers":
        json.dump({"sd3": linears(SD3Transformer2DModel(**SD3)), "sdxl": linears(UNet2DConditionModel(**SDXL))},
                  open(sys.argv[2], "w"))
    elif sys.argv[1] == "sd3":
        json.dump(sd3(json.load(open(sys.argv[2]))["pieces"]), open(sys.argv[3], "w"))
    elif sys.argv[1] == "sdxl":
        json.dump(sdxl(json.load(open(sys.argv[2]))), open(sys.argv[3], "w"))
    else:
        sys.exit(__doc__)
