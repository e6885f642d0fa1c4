package layout

import (
	"fmt"
	"strconv"
	"strings"
)

// unetShape describes which UNet levels carry attention, which is all the
// LDM ↔ diffusers name conversion depends on (from diffusers'
// scripts/convert_diffusers_to_original_stable_diffusion.py, the map kohya
// and SD.Next copy).
type unetShape struct {
	levels   int
	downAttn []bool // per down level
	upAttn   []bool // per up level
	label    bool   // SDXL's label_emb / add_embedding
}

var (
	sd15UNet = unetShape{levels: 4, downAttn: []bool{true, true, true, false}, upAttn: []bool{false, true, true, true}}
	sdxlUNet = unetShape{levels: 3, downAttn: []bool{false, true, true}, upAttn: []bool{true, true, false}, label: true}
)

func unetFor(l Layout) (unetShape, error) {
	switch l {
	case SD15:
		return sd15UNet, nil
	case SDXL:
		return sdxlUNet, nil
	}
	return unetShape{}, fmt.Errorf("unet names: layout %s is not a UNet layout", l)
}

// prefixPair is one (LDM, diffusers) module-path prefix pair.
type prefixPair struct{ ldm, diff string }

// resnetPairs renames the inside of a ResBlock.
var resnetPairs = []prefixPair{
	{"in_layers.0", "norm1"}, {"in_layers.2", "conv1"}, {"out_layers.0", "norm2"},
	{"out_layers.3", "conv2"}, {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"},
}

// pairs returns the module-level (LDM, diffusers) pairs; "res" marks the
// ResBlocks whose insides also need resnetPairs.
func (u unetShape) pairs() (mods, res []prefixPair) {
	mods = []prefixPair{
		{"time_embed.0", "time_embedding.linear_1"}, {"time_embed.2", "time_embedding.linear_2"},
		{"input_blocks.0.0", "conv_in"}, {"out.0", "conv_norm_out"}, {"out.2", "conv_out"},
		{"middle_block.1", "mid_block.attentions.0"},
	}
	if u.label {
		mods = append(mods, prefixPair{"label_emb.0.0", "add_embedding.linear_1"}, prefixPair{"label_emb.0.2", "add_embedding.linear_2"})
	}
	for j := 0; j < 2; j++ {
		res = append(res, prefixPair{"middle_block." + strconv.Itoa(2*j), "mid_block.resnets." + strconv.Itoa(j)})
	}
	for i := 0; i < u.levels; i++ {
		is := strconv.Itoa(i)
		for j := 0; j < 2; j++ {
			ldm := "input_blocks." + strconv.Itoa(3*i+j+1)
			res = append(res, prefixPair{ldm + ".0", "down_blocks." + is + ".resnets." + strconv.Itoa(j)})
			if u.downAttn[i] {
				mods = append(mods, prefixPair{ldm + ".1", "down_blocks." + is + ".attentions." + strconv.Itoa(j)})
			}
		}
		for j := 0; j < 3; j++ {
			ldm := "output_blocks." + strconv.Itoa(3*i+j)
			res = append(res, prefixPair{ldm + ".0", "up_blocks." + is + ".resnets." + strconv.Itoa(j)})
			if u.upAttn[i] {
				mods = append(mods, prefixPair{ldm + ".1", "up_blocks." + is + ".attentions." + strconv.Itoa(j)})
			}
		}
		if i < u.levels-1 {
			mods = append(mods, prefixPair{"input_blocks." + strconv.Itoa(3*(i+1)) + ".0.op", "down_blocks." + is + ".downsamplers.0.conv"})
			up := "1"
			if u.upAttn[i] {
				up = "2"
			}
			mods = append(mods, prefixPair{"output_blocks." + strconv.Itoa(3*i+2) + "." + up + ".conv", "up_blocks." + is + ".upsamplers.0.conv"})
		}
	}
	return mods, res
}

// UNetToDiffusers converts an LDM UNet module path ("input_blocks.4.1.
// transformer_blocks.0.attn1.to_q", no "model.diffusion_model." prefix) to
// its diffusers path ("down_blocks.1.attentions.0.transformer_blocks.0.
// attn1.to_q") for SDXL or SD15. ok is false for paths outside the table.
func UNetToDiffusers(l Layout, ldm string) (string, bool) {
	return convertUNet(l, ldm, true)
}

// UNetToLDM is the inverse of UNetToDiffusers.
func UNetToLDM(l Layout, diffusers string) (string, bool) {
	return convertUNet(l, diffusers, false)
}

func convertUNet(l Layout, name string, toDiff bool) (string, bool) {
	u, err := unetFor(l)
	if err != nil {
		return "", false
	}
	mods, res := u.pairs()
	from := func(p prefixPair) (string, string) {
		if toDiff {
			return p.ldm, p.diff
		}
		return p.diff, p.ldm
	}
	for _, p := range res {
		f, t := from(p)
		rest, ok := cutModule(name, f)
		if !ok {
			continue
		}
		if rest == "" {
			return t, true
		}
		for _, q := range resnetPairs {
			qf, qt := from(q)
			if r2, ok := cutModule(rest, qf); ok {
				return t + "." + qt + dotted(r2), true
			}
		}
		return "", false
	}
	for _, p := range mods {
		f, t := from(p)
		if rest, ok := cutModule(name, f); ok {
			return t + dotted(rest), true
		}
	}
	return "", false
}

// cutModule strips prefix from name when it ends at a path boundary,
// returning the rest without its leading dot.
func cutModule(name, prefix string) (string, bool) {
	if name == prefix {
		return "", true
	}
	if rest, ok := strings.CutPrefix(name, prefix+"."); ok {
		return rest, true
	}
	return "", false
}

func dotted(rest string) string {
	if rest == "" {
		return ""
	}
	return "." + rest
}

// TextEncoder identifies one of a UNet model's text encoders.
type TextEncoder int

// Text encoders of SD1.5 (TE1 only) and SDXL (both).
const (
	TE1 TextEncoder = 1 // CLIP-L: kohya lora_te_ / lora_te1_, diffusers text_encoder.
	TE2 TextEncoder = 2 // SDXL OpenCLIP-G: kohya lora_te2_, diffusers text_encoder_2.
	TE3 TextEncoder = 3 // T5-XXL (Flux, SD3): kohya lora_te3_, diffusers text_encoder_3.
)

// TextEncoderPrefixes lists the prefixes under which a checkpoint stores the
// text encoder's transformers-named modules ("text_model.encoder.layers.0.
// self_attn.q_proj"): single-file SD1.5 cond_stage_model.transformer., SDXL
// conditioner.embedders.0.transformer., and diffusers text_encoder(_2).
// SDXL's single-file OpenCLIP-G (conditioner.embedders.1.model.) uses
// OpenCLIP names and fused in_proj weights; see OpenCLIPRowMaps.
func TextEncoderPrefixes(te TextEncoder) []string {
	switch te {
	case TE2:
		return []string{"text_encoder_2.", "te2."}
	case TE3:
		return []string{"text_encoders.t5xxl.transformer.", "text_encoder_3.", "te3."}
	}
	return []string{"text_encoder.", "cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer.", "te1."}
}

// OpenCLIPRowMaps maps layer i of a transformers-named CLIP text encoder
// (self_attn.q_proj/k_proj/v_proj/out_proj, mlp.fc1/fc2) onto the OpenCLIP
// names SDXL single-file checkpoints use for text encoder 2
// (transformer.resblocks.i.attn.in_proj is q, k, v fused by rows;
// attn.out_proj; mlp.c_fc; mlp.c_proj). Field BFL holds the OpenCLIP (fused)
// name and Diffusers the transformers name. width is the model width (1280
// for OpenCLIP-G), read from the checkpoint.
func OpenCLIPRowMaps(layer, width, mlp int) []RowMap {
	oc := "transformer.resblocks." + strconv.Itoa(layer) + "."
	hf := "text_model.encoder.layers." + strconv.Itoa(layer) + "."
	return []RowMap{
		{BFL: oc + "attn.in_proj", BFLRow: 0, Diffusers: hf + "self_attn.q_proj", Rows: width},
		{BFL: oc + "attn.in_proj", BFLRow: width, Diffusers: hf + "self_attn.k_proj", Rows: width},
		{BFL: oc + "attn.in_proj", BFLRow: 2 * width, Diffusers: hf + "self_attn.v_proj", Rows: width},
		{BFL: oc + "attn.out_proj", Diffusers: hf + "self_attn.out_proj", Rows: width},
		{BFL: oc + "mlp.c_fc", Diffusers: hf + "mlp.fc1", Rows: mlp},
		{BFL: oc + "mlp.c_proj", Diffusers: hf + "mlp.fc2", Rows: width},
	}
}
