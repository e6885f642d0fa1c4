package layout

import (
	"fmt"
	"strings"
	"testing"
)

// The figures in these tests are the reference's §C.2 table, computed there
// from the published FLUX.1 shapes.
func TestFluxCounts(t *testing.T) {
	tests := []struct {
		name             string
		cfg              FluxConfig
		bfl, bflBlocks   int
		diff, diffBlocks int
		params           int64
	}{
		{"dev", FluxDev(), 314, 304, 504, 494, 11_901_408_320},
		{"schnell", FluxSchnell(), 312, 304, 502, 494, 11_891_178_560},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bfl, err := tc.cfg.Linears(FluxBFL)
			if err != nil {
				t.Fatal(err)
			}
			diff, err := tc.cfg.Linears(FluxDiffusers)
			if err != nil {
				t.Fatal(err)
			}
			if len(bfl) != tc.bfl || len(diff) != tc.diff {
				t.Errorf("linears: bfl %d diffusers %d, want %d %d", len(bfl), len(diff), tc.bfl, tc.diff)
			}
			if got := countIn(bfl, "double_blocks.", "single_blocks."); got != tc.bflBlocks || got != tc.cfg.BlockLinears(FluxBFL) {
				t.Errorf("bfl block linears %d (BlockLinears %d), want %d", got, tc.cfg.BlockLinears(FluxBFL), tc.bflBlocks)
			}
			if got := countIn(diff, "transformer_blocks.", "single_transformer_blocks."); got != tc.diffBlocks || got != tc.cfg.BlockLinears(FluxDiffusers) {
				t.Errorf("diffusers block linears %d, want %d", got, tc.diffBlocks)
			}
			p, err := tc.cfg.Params()
			if err != nil {
				t.Fatal(err)
			}
			if p != tc.params {
				t.Errorf("params %d, want %d", p, tc.params)
			}
			var pd int64
			ts, _ := tc.cfg.Tensors(FluxDiffusers)
			for _, s := range ts {
				pd += s.Elements()
			}
			if pd != p {
				t.Errorf("diffusers params %d != bfl params %d", pd, p)
			}
		})
	}
}

func countIn(ls []Linear, prefixes ...string) int {
	n := 0
	for _, l := range ls {
		for _, p := range prefixes {
			if strings.HasPrefix(l.Name, p) {
				n++
				break
			}
		}
	}
	return n
}

func TestFluxDevBlockParamsAndBytes(t *testing.T) {
	c := FluxDev()
	sum := func(ls []fluxLayer) int64 {
		var n int64
		for _, l := range ls {
			n += int64(l.out)*int64(l.in) + int64(l.out)
		}
		return n
	}
	norms := int64(4 * c.HeadDim)
	if got := sum(c.doubleLayers(0)) + norms; got != 339_831_296 {
		t.Errorf("double block params %d, want 339831296", got)
	}
	if got := sum(c.singleLayers(0)) + int64(2*c.HeadDim); got != 141_591_808 {
		t.Errorf("single block params %d, want 141591808", got)
	}
	if got := sum(c.headLayers()) + sum(c.tailLayers()); got != 64_124_992 {
		t.Errorf("non-block params %d, want 64124992", got)
	}
	lin, _ := c.Linears(FluxBFL)
	var w int64
	var largest Linear
	for _, l := range lin {
		w += int64(l.Out) * int64(l.In)
		if int64(l.Out)*int64(l.In) > int64(largest.Out)*int64(largest.In) {
			largest = l
		}
	}
	if gb := fmt.Sprintf("%.2f", float64(2*w)/1e9); gb != "23.80" {
		t.Errorf("bf16 linear weight bytes %s GB, want 23.80", gb)
	}
	if gib := fmt.Sprintf("%.2f", float64(2*w)/(1<<30)); gib != "22.16" {
		t.Errorf("bf16 linear weight bytes %s GiB, want 22.16", gib)
	}
	if largest.Name != "single_blocks.0.linear1" || largest.Out != 21504 || largest.In != 3072 {
		t.Errorf("largest linear %+v, want single_blocks.0.linear1 [21504 3072]", largest)
	}
	if mib := float64(4*largest.Out*largest.In) / (1 << 20); mib != 252 {
		t.Errorf("largest fp32 temp %v MiB, want 252", mib)
	}
}

func TestFluxShapes(t *testing.T) {
	c := FluxDev()
	bfl, _ := c.Linears(FluxBFL)
	diff, _ := c.Linears(FluxDiffusers)
	want := map[string][2]int{
		"img_in": {3072, 64}, "txt_in": {3072, 4096}, "time_in.in_layer": {3072, 256},
		"vector_in.in_layer": {3072, 768}, "guidance_in.out_layer": {3072, 3072},
		"double_blocks.18.img_mod.lin": {18432, 3072}, "double_blocks.0.txt_attn.qkv": {9216, 3072},
		"double_blocks.3.img_mlp.2": {3072, 12288}, "single_blocks.37.linear1": {21504, 3072},
		"single_blocks.0.linear2": {3072, 15360}, "single_blocks.5.modulation.lin": {9216, 3072},
		"final_layer.linear": {64, 3072}, "final_layer.adaLN_modulation.1": {6144, 3072},
		"x_embedder": {3072, 64}, "context_embedder": {3072, 4096},
		"transformer_blocks.0.attn.to_q": {3072, 3072}, "transformer_blocks.0.attn.add_v_proj": {3072, 3072},
		"transformer_blocks.0.norm1_context.linear": {18432, 3072}, "transformer_blocks.0.ff_context.net.2": {3072, 12288},
		"single_transformer_blocks.0.proj_mlp": {12288, 3072}, "single_transformer_blocks.0.proj_out": {3072, 15360},
		"single_transformer_blocks.0.norm.linear": {9216, 3072}, "norm_out.linear": {6144, 3072}, "proj_out": {64, 3072},
		"time_text_embed.guidance_embedder.linear_1": {3072, 256},
	}
	got := map[string][2]int{}
	for _, l := range append(bfl, diff...) {
		got[l.Name] = [2]int{l.Out, l.In}
	}
	for n, w := range want {
		if got[n] != w {
			t.Errorf("%s: shape %v, want %v", n, got[n], w)
		}
	}
}

// Every row of every layer in either layout is covered exactly once by the
// row maps, and each map stays inside both layers.
func TestRowMapsCoverEveryRowOnce(t *testing.T) {
	for _, c := range []FluxConfig{FluxDev(), FluxSchnell(), FluxSample(), Chroma(), fill(), lite()} {
		maps, err := c.RowMaps()
		if err != nil {
			t.Fatal(err)
		}
		bfl, _ := c.Linears(FluxBFL)
		diff, _ := c.Linears(FluxDiffusers)
		for _, side := range []struct {
			name   string
			layers []Linear
			pick   func(RowMap) (string, int)
		}{
			{"bfl", bfl, func(m RowMap) (string, int) { return m.BFL, m.BFLRow }},
			{"diffusers", diff, func(m RowMap) (string, int) { return m.Diffusers, m.DiffRow }},
		} {
			cover := map[string][]int{}
			byName := map[string]Linear{}
			for _, l := range side.layers {
				cover[l.Name] = make([]int, l.Out)
				byName[l.Name] = l
			}
			for _, m := range maps {
				name, off := side.pick(m)
				rows, ok := cover[name]
				if !ok {
					t.Fatalf("%s: row map names unknown layer %s", side.name, name)
				}
				if off < 0 || off+m.Rows > len(rows) {
					t.Fatalf("%s: row map %+v outside %s (%d rows)", side.name, m, name, len(rows))
				}
				for r := off; r < off+m.Rows; r++ {
					rows[r]++
				}
			}
			for name, rows := range cover {
				for r, n := range rows {
					if n != 1 {
						t.Fatalf("%s: %s row %d covered %d times", side.name, name, r, n)
					}
				}
			}
		}
		// Both layers of a map read the same input.
		in := map[string]int{}
		for _, l := range append(bfl, diff...) {
			in[l.Name] = l.In
		}
		for _, m := range maps {
			if in[m.BFL] != in[m.Diffusers] {
				t.Fatalf("%+v: in %d vs %d", m, in[m.BFL], in[m.Diffusers])
			}
		}
	}
}

func TestRowMapsFusedSplits(t *testing.T) {
	maps, _ := FluxDev().RowMaps()
	want := []RowMap{
		{"double_blocks.0.img_attn.qkv", 3072, "transformer_blocks.0.attn.to_k", 0, 3072},
		{"double_blocks.7.txt_attn.qkv", 6144, "transformer_blocks.7.attn.add_v_proj", 0, 3072},
		{"single_blocks.2.linear1", 9216, "single_transformer_blocks.2.proj_mlp", 0, 12288},
		{"single_blocks.2.linear1", 0, "single_transformer_blocks.2.attn.to_q", 0, 3072},
		{"single_blocks.2.linear2", 0, "single_transformer_blocks.2.proj_out", 0, 3072},
		{"final_layer.adaLN_modulation.1", 0, "norm_out.linear", 3072, 3072},
		{"final_layer.adaLN_modulation.1", 3072, "norm_out.linear", 0, 3072},
		{"img_in", 0, "x_embedder", 0, 3072},
	}
	have := map[RowMap]bool{}
	for _, m := range maps {
		have[m] = true
	}
	for _, w := range want {
		if !have[w] {
			t.Errorf("missing row map %+v", w)
		}
	}
}

func TestSample(t *testing.T) {
	ts, err := Sample(FluxSample())
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[Kind]int{}
	var params int64
	for i, s := range ts {
		kinds[s.Kind]++
		params += s.Elements()
		if i > 0 && ts[i-1].Name >= s.Name {
			t.Fatalf("not sorted at %s", s.Name)
		}
	}
	// 10 top-level + 2×10 double + 4×3 single linears; norms 2×4 + 4×2.
	if kinds[KindLinear] != 42 || kinds[KindBias] != 42 || kinds[KindNormScale] != 16 {
		t.Errorf("kinds %v, want 42 linear, 42 bias, 16 norm-scale", kinds)
	}
	byName := map[string][]int{}
	for _, s := range ts {
		byName[s.Name] = s.Shape
	}
	for n, w := range map[string][]int{
		"double_blocks.1.img_attn.qkv.weight":          {768, 256},
		"single_blocks.3.linear1.weight":               {1792, 256},
		"single_blocks.3.linear2.weight":               {256, 1280},
		"double_blocks.0.img_mod.lin.weight":           {1536, 256},
		"double_blocks.0.txt_attn.norm.key_norm.scale": {128},
		"single_blocks.0.norm.query_norm.scale":        {128},
		"txt_in.weight":                                {256, 4096},
		"final_layer.adaLN_modulation.1.bias":          {512},
		"guidance_in.in_layer.weight":                  {256, 256},
	} {
		if fmt.Sprint(byName[n]) != fmt.Sprint(w) {
			t.Errorf("%s: shape %v, want %v", n, byName[n], w)
		}
	}
	if params < 10e6 || params > 20e6 {
		t.Errorf("sample has %d params; meant to be ≈12.6 M", params)
	}
}

func TestFluxConfigFromShapes(t *testing.T) {
	for _, c := range []FluxConfig{FluxDev(), FluxSchnell(), FluxSample(), {Hidden: 256, HeadDim: 64, MLP: 1024, InChannels: 64, ContextDim: 64, VecDim: 32, TimeDim: 256, SingleBlocks: 1}} {
		for _, l := range []Layout{FluxBFL, FluxDiffusers} {
			ts, err := c.Tensors(l)
			if err != nil {
				t.Fatal(err)
			}
			shapes := map[string][]int{}
			for _, s := range ts {
				shapes[s.Name] = s.Shape
			}
			got, err := FluxConfigFromShapes(l, shapes)
			if err != nil {
				t.Fatalf("%s %+v: %v", l, c, err)
			}
			if got != c {
				t.Errorf("%s: got %+v, want %+v", l, got, c)
			}
		}
	}
	_, err := FluxConfigFromShapes(FluxBFL, map[string][]int{"img_in.weight": {3072, 64}})
	if err == nil || !strings.Contains(err.Error(), "no blocks found") {
		t.Errorf("no blocks: err %v", err)
	}
	_, err = FluxConfigFromShapes(FluxBFL, map[string][]int{"double_blocks.0.img_attn.norm.query_norm.scale": {128}})
	if err == nil || !strings.Contains(err.Error(), "no layer gives the hidden width") {
		t.Errorf("no hidden: err %v", err)
	}
}

func TestValidate(t *testing.T) {
	bad := FluxSample()
	bad.Hidden = 200
	if _, err := bad.Linears(FluxBFL); err == nil || !strings.Contains(err.Error(), "head_dim") {
		t.Errorf("hidden 200 / head 128: err %v", err)
	}
	bad = FluxSample()
	bad.MLP = 0
	if _, err := Sample(bad); err == nil || !strings.Contains(err.Error(), "mlp") {
		t.Errorf("mlp 0: err %v", err)
	}
	if _, err := FluxSample().Linears(SDXL); err == nil {
		t.Error("Linears(SDXL) succeeded")
	}
}
