package layout

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// FluxConfig describes a Flux transformer. Every layer shape follows from it
// by the rules of the BFL reference implementation (flux/model.py):
// modulation layers are 6·Hidden (double) and 3·Hidden (single) wide, the
// single-block linear1 is 3·Hidden+MLP wide and linear2 reads Hidden+MLP.
type FluxConfig struct {
	Hidden       int  `json:"hidden"`                 // 3072 in FLUX.1
	HeadDim      int  `json:"head_dim"`               // 128; Hidden/HeadDim heads
	MLP          int  `json:"mlp"`                    // Hidden·mlp_ratio, 12288 in FLUX.1
	InChannels   int  `json:"in_channels"`            // 64 (packed 2×2 latents of 16 channels)
	OutCh        int  `json:"out_channels,omitempty"` // final layer width when not InChannels (Fill 64 of 384)
	ContextDim   int  `json:"context_dim"`            // 4096 (T5-XXL)
	VecDim       int  `json:"vec_dim"`                // 768 (CLIP-L pooled)
	TimeDim      int  `json:"time_dim"`               // 256 (sinusoidal embedding width)
	DoubleBlocks int  `json:"double_blocks"`          // 19
	SingleBlocks int  `json:"single_blocks"`          // 38
	Guidance     bool `json:"guidance"`               // guidance_in present (dev), absent (schnell)
	// Chroma marks Chroma's pruned guidance path: no img_mod/txt_mod,
	// modulation or final adaLN layers and no vector_in/time_in/guidance_in
	// (VecDim and TimeDim are 0); Approximator describes the
	// distilled_guidance_layer that produces every modulation vector.
	Chroma       bool         `json:"chroma,omitempty"`
	Approximator Approximator `json:"approximator,omitzero"`
}

// Approximator is Chroma's distilled_guidance_layer: in_proj [Hidden, InDim],
// Layers MLP blocks of two [Hidden, Hidden] linears each (BFL
// layers.N.in_layer/out_layer, diffusers layers.N.linear_1/linear_2) with an
// RMSNorm [Hidden] each, and out_proj [model hidden, Hidden].
type Approximator struct {
	InDim  int `json:"in_dim"` // approximator_num_channels, 64
	Hidden int `json:"hidden"` // approximator_hidden_dim, 5120
	Layers int `json:"layers"` // approximator_layers, 5
}

// Chroma is Chroma (lodestones): FLUX.1-schnell's blocks with the guidance
// path replaced by the distilled_guidance_layer approximator.
func Chroma() FluxConfig {
	c := FluxSchnell()
	c.VecDim, c.TimeDim = 0, 0
	c.Chroma = true
	c.Approximator = Approximator{InDim: 64, Hidden: 5120, Layers: 5}
	return c
}

// FluxDev is FLUX.1-dev.
func FluxDev() FluxConfig {
	return FluxConfig{Hidden: 3072, HeadDim: 128, MLP: 12288, InChannels: 64, ContextDim: 4096,
		VecDim: 768, TimeDim: 256, DoubleBlocks: 19, SingleBlocks: 38, Guidance: true}
}

// FluxSchnell is FLUX.1-schnell: FLUX.1-dev without guidance_in.
func FluxSchnell() FluxConfig {
	c := FluxDev()
	c.Guidance = false
	return c
}

// FluxSample is the small model `arenahost sample` writes: the same width
// rules as FLUX.1 (head dim 128, mlp ratio 4, real in/context/vec/time
// widths, guidance) at hidden 256 (2 heads) with 2 double and 4 single
// blocks, about 12.6 M parameters.
func FluxSample() FluxConfig {
	return FluxConfig{Hidden: 256, HeadDim: 128, MLP: 1024, InChannels: 64, ContextDim: 4096,
		VecDim: 768, TimeDim: 256, DoubleBlocks: 2, SingleBlocks: 4, Guidance: true}
}

// Validate checks that every width is positive and the head width divides
// the hidden width.
func (c FluxConfig) Validate() error {
	type field struct {
		name string
		v    int
	}
	fs := []field{{"hidden", c.Hidden}, {"head_dim", c.HeadDim}, {"mlp", c.MLP}, {"in_channels", c.InChannels},
		{"context_dim", c.ContextDim}}
	if c.Chroma {
		fs = append(fs, field{"approximator.in_dim", c.Approximator.InDim}, field{"approximator.hidden", c.Approximator.Hidden},
			field{"approximator.layers", c.Approximator.Layers})
		if c.VecDim != 0 || c.TimeDim != 0 || c.Guidance {
			return fmt.Errorf("flux config: chroma has no vector_in/time_in/guidance_in (vec_dim %d, time_dim %d, guidance %v)", c.VecDim, c.TimeDim, c.Guidance)
		}
	} else {
		fs = append(fs, field{"vec_dim", c.VecDim}, field{"time_dim", c.TimeDim})
	}
	for _, f := range fs {
		if f.v <= 0 {
			return fmt.Errorf("flux config: %s = %d, want > 0", f.name, f.v)
		}
	}
	if c.DoubleBlocks < 0 || c.SingleBlocks < 0 {
		return fmt.Errorf("flux config: negative block count (%d double, %d single)", c.DoubleBlocks, c.SingleBlocks)
	}
	if c.Hidden%c.HeadDim != 0 {
		return fmt.Errorf("flux config: hidden %d not a multiple of head_dim %d", c.Hidden, c.HeadDim)
	}
	return nil
}

// Heads returns the number of attention heads.
func (c FluxConfig) Heads() int { return c.Hidden / c.HeadDim }

// fluxLayer is one row of the BFL ↔ diffusers table: a BFL module and the
// diffusers module(s) holding its rows, in row order. swap marks the final
// adaLN modulation, whose two halves are stored in opposite order.
type fluxLayer struct {
	bfl   string
	out   int
	in    int
	diff  []string
	split []int // rows per diffusers part; nil = 1:1
	swap  bool
}

func (c FluxConfig) doubleLayers(i int) []fluxLayer {
	h, m := c.Hidden, c.MLP
	b, d := "double_blocks."+strconv.Itoa(i)+".", "transformer_blocks."+strconv.Itoa(i)+"."
	ls := []fluxLayer{
		{bfl: b + "img_mod.lin", out: 6 * h, in: h, diff: []string{d + "norm1.linear"}},
		{bfl: b + "img_attn.qkv", out: 3 * h, in: h, diff: []string{d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"}, split: []int{h, h, h}},
		{bfl: b + "img_attn.proj", out: h, in: h, diff: []string{d + "attn.to_out.0"}},
		{bfl: b + "img_mlp.0", out: m, in: h, diff: []string{d + "ff.net.0.proj"}},
		{bfl: b + "img_mlp.2", out: h, in: m, diff: []string{d + "ff.net.2"}},
		{bfl: b + "txt_mod.lin", out: 6 * h, in: h, diff: []string{d + "norm1_context.linear"}},
		{bfl: b + "txt_attn.qkv", out: 3 * h, in: h, diff: []string{d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"}, split: []int{h, h, h}},
		{bfl: b + "txt_attn.proj", out: h, in: h, diff: []string{d + "attn.to_add_out"}},
		{bfl: b + "txt_mlp.0", out: m, in: h, diff: []string{d + "ff_context.net.0.proj"}},
		{bfl: b + "txt_mlp.2", out: h, in: m, diff: []string{d + "ff_context.net.2"}},
	}
	if c.Chroma {
		return withoutModulation(ls)
	}
	return ls
}

// withoutModulation drops the adaLN modulation layers Chroma prunes.
func withoutModulation(ls []fluxLayer) []fluxLayer {
	out := ls[:0]
	for _, l := range ls {
		if !strings.HasSuffix(l.bfl, "_mod.lin") && !strings.HasSuffix(l.bfl, ".modulation.lin") && !l.swap {
			out = append(out, l)
		}
	}
	return out
}

func (c FluxConfig) singleLayers(i int) []fluxLayer {
	h, m := c.Hidden, c.MLP
	b, d := "single_blocks."+strconv.Itoa(i)+".", "single_transformer_blocks."+strconv.Itoa(i)+"."
	ls := []fluxLayer{
		{bfl: b + "linear1", out: 3*h + m, in: h, diff: []string{d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"}, split: []int{h, h, h, m}},
		{bfl: b + "linear2", out: h, in: h + m, diff: []string{d + "proj_out"}},
		{bfl: b + "modulation.lin", out: 3 * h, in: h, diff: []string{d + "norm.linear"}},
	}
	if c.Chroma {
		return withoutModulation(ls)
	}
	return ls
}

func (c FluxConfig) headLayers() []fluxLayer {
	h := c.Hidden
	ls := []fluxLayer{{bfl: "img_in", out: h, in: c.InChannels, diff: []string{"x_embedder"}}}
	if c.Chroma {
		a, g := c.Approximator, "distilled_guidance_layer."
		ls = append(ls, fluxLayer{bfl: g + "in_proj", out: a.Hidden, in: a.InDim, diff: []string{g + "in_proj"}})
		for i := 0; i < a.Layers; i++ {
			l := g + "layers." + strconv.Itoa(i) + "."
			ls = append(ls,
				fluxLayer{bfl: l + "in_layer", out: a.Hidden, in: a.Hidden, diff: []string{l + "linear_1"}},
				fluxLayer{bfl: l + "out_layer", out: a.Hidden, in: a.Hidden, diff: []string{l + "linear_2"}})
		}
		ls = append(ls, fluxLayer{bfl: g + "out_proj", out: h, in: a.Hidden, diff: []string{g + "out_proj"}})
		return append(ls, fluxLayer{bfl: "txt_in", out: h, in: c.ContextDim, diff: []string{"context_embedder"}})
	}
	ls = append(ls,
		fluxLayer{bfl: "time_in.in_layer", out: h, in: c.TimeDim, diff: []string{"time_text_embed.timestep_embedder.linear_1"}},
		fluxLayer{bfl: "time_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.timestep_embedder.linear_2"}},
		fluxLayer{bfl: "vector_in.in_layer", out: h, in: c.VecDim, diff: []string{"time_text_embed.text_embedder.linear_1"}},
		fluxLayer{bfl: "vector_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.text_embedder.linear_2"}})
	if c.Guidance {
		ls = append(ls,
			fluxLayer{bfl: "guidance_in.in_layer", out: h, in: c.TimeDim, diff: []string{"time_text_embed.guidance_embedder.linear_1"}},
			fluxLayer{bfl: "guidance_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.guidance_embedder.linear_2"}})
	}
	return append(ls, fluxLayer{bfl: "txt_in", out: h, in: c.ContextDim, diff: []string{"context_embedder"}})
}

func (c FluxConfig) tailLayers() []fluxLayer {
	h := c.Hidden
	ls := []fluxLayer{
		{bfl: "final_layer.linear", out: c.OutChannels(), in: h, diff: []string{"proj_out"}},
		{bfl: "final_layer.adaLN_modulation.1", out: 2 * h, in: h, diff: []string{"norm_out.linear"}, swap: true},
	}
	if c.Chroma {
		return withoutModulation(ls)
	}
	return ls
}

// OutChannels is the width of final_layer.linear / proj_out: the packed
// latent channels, 64 in every FLUX.1 variant (Fill, Depth and Canny read
// more channels than they write).
func (c FluxConfig) OutChannels() int {
	if c.OutCh > 0 {
		return c.OutCh
	}
	return c.InChannels
}

func (c FluxConfig) table() []fluxLayer {
	ls := c.headLayers()
	for i := 0; i < c.DoubleBlocks; i++ {
		ls = append(ls, c.doubleLayers(i)...)
	}
	for i := 0; i < c.SingleBlocks; i++ {
		ls = append(ls, c.singleLayers(i)...)
	}
	return append(ls, c.tailLayers()...)
}

// Linears returns every Linear layer of the model in the given Flux layout,
// in module order. Every Flux Linear has a bias. FLUX.1-dev has 314 in BFL
// layout (304 in blocks: 19×10 + 38×3) and 504 in diffusers layout (494 in
// blocks: 19×14 + 38×6).
func (c FluxConfig) Linears(l Layout) ([]Linear, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	var out []Linear
	for _, fl := range c.table() {
		switch l {
		case FluxBFL:
			out = append(out, Linear{Name: fl.bfl, Out: fl.out, In: fl.in, Bias: true})
		case FluxDiffusers:
			for j, d := range fl.diff {
				rows := fl.out
				if fl.split != nil {
					rows = fl.split[j]
				}
				out = append(out, Linear{Name: d, Out: rows, In: fl.in, Bias: true})
			}
		default:
			return nil, fmt.Errorf("flux linears: layout %s is not a Flux layout", l)
		}
	}
	return out, nil
}

// BlockLinears counts the Linear layers inside double and single blocks.
func (c FluxConfig) BlockLinears(l Layout) int {
	switch l {
	case FluxBFL:
		return 10*c.DoubleBlocks + 3*c.SingleBlocks
	case FluxDiffusers:
		return 14*c.DoubleBlocks + 6*c.SingleBlocks
	}
	return 0
}

// Tensors returns every tensor of the model in the given Flux layout: each
// Linear's weight [out, in] and bias [out], and the QK RMSNorm scales
// [head_dim]. The LayerNorms of Flux have no parameters.
func (c FluxConfig) Tensors(l Layout) ([]LayerSpec, error) {
	lin, err := c.Linears(l)
	if err != nil {
		return nil, err
	}
	var out []LayerSpec
	for _, li := range lin {
		out = append(out,
			LayerSpec{Name: li.Name + ".weight", Shape: []int{li.Out, li.In}, Kind: KindLinear},
			LayerSpec{Name: li.Name + ".bias", Shape: []int{li.Out}, Kind: KindBias})
	}
	norm := func(name string) {
		out = append(out, LayerSpec{Name: name, Shape: []int{c.HeadDim}, Kind: KindNormScale})
	}
	for i := 0; i < c.DoubleBlocks; i++ {
		if l == FluxBFL {
			b := "double_blocks." + strconv.Itoa(i) + "."
			for _, s := range []string{"img_attn", "txt_attn"} {
				norm(b + s + ".norm.query_norm.scale")
				norm(b + s + ".norm.key_norm.scale")
			}
		} else {
			b := "transformer_blocks." + strconv.Itoa(i) + ".attn."
			for _, s := range []string{"norm_q", "norm_k", "norm_added_q", "norm_added_k"} {
				norm(b + s + ".weight")
			}
		}
	}
	for i := 0; i < c.Approximator.Layers && c.Chroma; i++ {
		n := "distilled_guidance_layer.norms." + strconv.Itoa(i) + ".weight"
		if l == FluxBFL {
			n = "distilled_guidance_layer.norms." + strconv.Itoa(i) + ".scale"
		}
		out = append(out, LayerSpec{Name: n, Shape: []int{c.Approximator.Hidden}, Kind: KindNormScale})
	}
	for i := 0; i < c.SingleBlocks; i++ {
		if l == FluxBFL {
			b := "single_blocks." + strconv.Itoa(i) + ".norm."
			norm(b + "query_norm.scale")
			norm(b + "key_norm.scale")
		} else {
			b := "single_transformer_blocks." + strconv.Itoa(i) + ".attn."
			norm(b + "norm_q.weight")
			norm(b + "norm_k.weight")
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Sample returns every tensor of a Flux model in BFL layout, sorted by name
// as a safetensors file stores them: the tensor list `arenahost sample`
// quantizes (its KindLinear weights) and writes.
func Sample(c FluxConfig) ([]LayerSpec, error) { return c.Tensors(FluxBFL) }

// Params returns the parameter count of the model (identical in both
// layouts).
func (c FluxConfig) Params() (int64, error) {
	ts, err := c.Tensors(FluxBFL)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, t := range ts {
		n += t.Elements()
	}
	return n, nil
}

// RowMap says that rows [BFLRow, BFLRow+Rows) of the BFL layer BFL are rows
// [DiffRow, DiffRow+Rows) of the diffusers layer Diffusers. Both layers read
// the same input, so a row map is all it takes to move a LoRA's B factor (or
// a delta's rows) between the namings; A is unchanged.
type RowMap struct {
	BFL       string `json:"bfl"`
	BFLRow    int    `json:"bfl_row"`
	Diffusers string `json:"diffusers"`
	DiffRow   int    `json:"diffusers_row"`
	Rows      int    `json:"rows"`
}

// RowMaps returns the full BFL ↔ diffusers correspondence of the model: one
// entry per 1:1 layer, one per part of a fused layer (img_attn.qkv → to_q,
// to_k, to_v at rows 0, H, 2H; linear1 → to_q, to_k, to_v, proj_mlp at 0, H,
// 2H, 3H), and two for final_layer.adaLN_modulation.1, whose (shift, scale)
// halves are norm_out.linear's (scale, shift). Split sizes come from the
// configuration, which DeriveFlux reads off a checkpoint; layers of the
// table the model does not have are simply never looked up.
func (c FluxConfig) RowMaps() ([]RowMap, error) {
	// Only the widths of layers the model has matter here (a derived
	// config has 0 for absent ones), and every row map needs the hidden
	// width.
	if c.Hidden <= 0 || c.MLP < 0 {
		return nil, fmt.Errorf("flux row maps: hidden %d, mlp %d", c.Hidden, c.MLP)
	}
	var out []RowMap
	for _, fl := range c.table() {
		switch {
		case fl.swap:
			half := fl.out / 2
			out = append(out,
				RowMap{BFL: fl.bfl, BFLRow: 0, Diffusers: fl.diff[0], DiffRow: half, Rows: half},
				RowMap{BFL: fl.bfl, BFLRow: half, Diffusers: fl.diff[0], DiffRow: 0, Rows: half})
		case fl.split != nil:
			off := 0
			for j, d := range fl.diff {
				out = append(out, RowMap{BFL: fl.bfl, BFLRow: off, Diffusers: d, DiffRow: 0, Rows: fl.split[j]})
				off += fl.split[j]
			}
		default:
			out = append(out, RowMap{BFL: fl.bfl, Diffusers: fl.diff[0], Rows: fl.out})
		}
	}
	return out, nil
}

// countBlocks returns 1 + the highest N among names "<prefix>N.…".
func countBlocks(shapes map[string][]int, prefix string) int {
	n := 0
	for name := range shapes {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		idx, _, ok := strings.Cut(rest, ".")
		if !ok {
			continue
		}
		if i, err := strconv.Atoi(idx); err == nil && i+1 > n {
			n = i + 1
		}
	}
	return n
}
