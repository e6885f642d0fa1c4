package layout

import "strconv"

// SD3RowMaps returns the correspondence between Stability's SD3/SD3.5
// MMDiT names (joint_blocks.N.{x_block,context_block}…, t_embedder,
// y_embedder, final_layer; field BFL) and diffusers' SD3Transformer2DModel
// names (transformer_blocks.N…, time_text_embed, proj_out; field
// Diffusers), following diffusers' convert_sd3_transformer_checkpoint_to_
// diffusers: the fused attention qkv splits into to_q/to_k/to_v (x_block,
// and attn2 in SD3.5's dual-attention blocks) and add_q/k/v_proj
// (context_block); the final adaLN and the last block's context adaLN
// (context_pre_only, 2·hidden rows) hold (shift, scale) where diffusers
// holds (scale, shift). rows gives a diffusers layer's row count, ok false
// when the model has no such layer; only layers the model has are mapped,
// for blocks 0..blocks-1.
func SD3RowMaps(blocks int, rows func(diffusers string) (int, bool)) []RowMap {
	var out []RowMap
	one := func(sai, diff string) {
		if n, ok := rows(diff); ok {
			out = append(out, RowMap{BFL: sai, Diffusers: diff, Rows: n})
		}
	}
	split := func(sai string, diffs ...string) {
		off := 0
		for _, d := range diffs {
			if _, ok := rows(d); !ok {
				return // a fused layer maps only when every part is there
			}
		}
		for _, d := range diffs {
			n, _ := rows(d)
			out = append(out, RowMap{BFL: sai, BFLRow: off, Diffusers: d, Rows: n})
			off += n
		}
	}
	swapped := func(sai, diff string) {
		if n, ok := rows(diff); ok {
			h := n / 2
			out = append(out, RowMap{BFL: sai, BFLRow: 0, Diffusers: diff, DiffRow: h, Rows: h},
				RowMap{BFL: sai, BFLRow: h, Diffusers: diff, DiffRow: 0, Rows: h})
		}
	}
	one("context_embedder", "context_embedder")
	one("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
	one("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
	one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
	one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
	one("final_layer.linear", "proj_out")
	swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
	for i := 0; i < blocks; i++ {
		s, d := "joint_blocks."+strconv.Itoa(i)+".", "transformer_blocks."+strconv.Itoa(i)+"."
		split(s+"x_block.attn.qkv", d+"attn.to_q", d+"attn.to_k", d+"attn.to_v")
		one(s+"x_block.attn.proj", d+"attn.to_out.0")
		split(s+"x_block.attn2.qkv", d+"attn2.to_q", d+"attn2.to_k", d+"attn2.to_v")
		one(s+"x_block.attn2.proj", d+"attn2.to_out.0")
		one(s+"x_block.mlp.fc1", d+"ff.net.0.proj")
		one(s+"x_block.mlp.fc2", d+"ff.net.2")
		one(s+"x_block.adaLN_modulation.1", d+"norm1.linear")
		split(s+"context_block.attn.qkv", d+"attn.add_q_proj", d+"attn.add_k_proj", d+"attn.add_v_proj")
		one(s+"context_block.attn.proj", d+"attn.to_add_out")
		one(s+"context_block.mlp.fc1", d+"ff_context.net.0.proj")
		one(s+"context_block.mlp.fc2", d+"ff_context.net.2")
		// context_pre_only (the last block): AdaLayerNormContinuous, 2·hidden rows, halves swapped.
		if n, ok := rows(d + "norm1_context.linear"); ok {
			if q, ok := rows(d + "attn.to_q"); ok && n == 2*q {
				swapped(s+"context_block.adaLN_modulation.1", d+"norm1_context.linear")
			} else {
				one(s+"context_block.adaLN_modulation.1", d+"norm1_context.linear")
			}
		}
	}
	return out
}
