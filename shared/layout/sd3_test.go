package layout

import (
	"strconv"
	"testing"
)

// SD3.5-shaped diffusers layers (hidden 64, 2 blocks: the first with dual
// attention, the last context_pre_only): every row of every diffusers layer
// is covered once, and the fused SAI layers get the sums of their parts.
func TestSD3RowMaps(t *testing.T) {
	const h = 64
	rows := map[string]int{"context_embedder": h, "time_text_embed.timestep_embedder.linear_1": h, "time_text_embed.timestep_embedder.linear_2": h,
		"time_text_embed.text_embedder.linear_1": h, "time_text_embed.text_embedder.linear_2": h, "proj_out": 16, "norm_out.linear": 2 * h}
	for i := 0; i < 2; i++ {
		d := "transformer_blocks." + strconv.Itoa(i) + "."
		for _, n := range []string{"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "ff.net.2"} {
			rows[d+n] = h
		}
		rows[d+"ff.net.0.proj"] = 4 * h
		rows[d+"norm1.linear"] = 6 * h
		if i == 0 {
			rows[d+"norm1.linear"] = 9 * h
			for _, n := range []string{"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn.to_add_out", "ff_context.net.2"} {
				rows[d+n] = h
			}
			rows[d+"ff_context.net.0.proj"] = 4 * h
			rows[d+"norm1_context.linear"] = 6 * h
		} else {
			rows[d+"norm1_context.linear"] = 2 * h
		}
	}
	maps := SD3RowMaps(2, func(d string) (int, bool) { n, ok := rows[d]; return n, ok })
	cover := map[string][]int{}
	sai := map[string]int{}
	for d, n := range rows {
		cover[d] = make([]int, n)
	}
	for _, m := range maps {
		for r := m.DiffRow; r < m.DiffRow+m.Rows; r++ {
			cover[m.Diffusers][r]++
		}
		sai[m.BFL] = max(sai[m.BFL], m.BFLRow+m.Rows)
	}
	for d, c := range cover {
		for r, n := range c {
			if n != 1 {
				t.Fatalf("%s row %d covered %d times", d, r, n)
			}
		}
	}
	for name, want := range map[string]int{"joint_blocks.0.x_block.attn.qkv": 3 * h, "joint_blocks.0.x_block.attn2.qkv": 3 * h,
		"joint_blocks.1.context_block.attn.qkv": 3 * h, "joint_blocks.1.context_block.adaLN_modulation.1": 2 * h, "final_layer.adaLN_modulation.1": 2 * h} {
		if sai[name] != want {
			t.Errorf("%s: %d rows, want %d", name, sai[name], want)
		}
	}
	for _, m := range maps {
		if m.BFL == "joint_blocks.1.context_block.adaLN_modulation.1" && m.BFLRow == 0 && m.DiffRow != h {
			t.Errorf("last block's context adaLN not swapped: %+v", m)
		}
		if m.BFL == "joint_blocks.0.context_block.adaLN_modulation.1" && m.DiffRow != 0 {
			t.Errorf("first block's context adaLN swapped: %+v", m)
		}
	}
}
