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
	Hidden       int  `json:"hidden"`        // 3072 in FLUX.1
	HeadDim      int  `json:"head_dim"`      // 128; Hidden/HeadDim heads
	MLP          int  `json:"mlp"`           // Hidden·mlp_ratio, 12288 in FLUX.1
	InChannels   int  `json:"in_channels"`   // 64 (packed 2×2 latents of 16 channels)
	ContextDim   int  `json:"context_dim"`   // 4096 (T5-XXL)
	VecDim       int  `json:"vec_dim"`       // 768 (CLIP-L pooled)
	TimeDim      int  `json:"time_dim"`      // 256 (sinusoidal embedding width)
	DoubleBlocks int  `json:"double_blocks"` // 19
	SingleBlocks int  `json:"single_blocks"` // 38
	Guidance     bool `json:"guidance"`      // guidance_in present (dev), absent (schnell)
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
	for _, f := range []struct {
		name string
		v    int
	}{{"hidden", c.Hidden}, {"head_dim", c.HeadDim}, {"mlp", c.MLP}, {"in_channels", c.InChannels},
		{"context_dim", c.ContextDim}, {"vec_dim", c.VecDim}, {"time_dim", c.TimeDim}} {
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
	return []fluxLayer{
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
}

func (c FluxConfig) singleLayers(i int) []fluxLayer {
	h, m := c.Hidden, c.MLP
	b, d := "single_blocks."+strconv.Itoa(i)+".", "single_transformer_blocks."+strconv.Itoa(i)+"."
	return []fluxLayer{
		{bfl: b + "linear1", out: 3*h + m, in: h, diff: []string{d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"}, split: []int{h, h, h, m}},
		{bfl: b + "linear2", out: h, in: h + m, diff: []string{d + "proj_out"}},
		{bfl: b + "modulation.lin", out: 3 * h, in: h, diff: []string{d + "norm.linear"}},
	}
}

func (c FluxConfig) headLayers() []fluxLayer {
	h := c.Hidden
	ls := []fluxLayer{
		{bfl: "img_in", out: h, in: c.InChannels, diff: []string{"x_embedder"}},
		{bfl: "time_in.in_layer", out: h, in: c.TimeDim, diff: []string{"time_text_embed.timestep_embedder.linear_1"}},
		{bfl: "time_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.timestep_embedder.linear_2"}},
		{bfl: "vector_in.in_layer", out: h, in: c.VecDim, diff: []string{"time_text_embed.text_embedder.linear_1"}},
		{bfl: "vector_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.text_embedder.linear_2"}},
	}
	if c.Guidance {
		ls = append(ls,
			fluxLayer{bfl: "guidance_in.in_layer", out: h, in: c.TimeDim, diff: []string{"time_text_embed.guidance_embedder.linear_1"}},
			fluxLayer{bfl: "guidance_in.out_layer", out: h, in: h, diff: []string{"time_text_embed.guidance_embedder.linear_2"}})
	}
	return append(ls, fluxLayer{bfl: "txt_in", out: h, in: c.ContextDim, diff: []string{"context_embedder"}})
}

func (c FluxConfig) tailLayers() []fluxLayer {
	h := c.Hidden
	return []fluxLayer{
		{bfl: "final_layer.linear", out: c.InChannels, in: h, diff: []string{"proj_out"}},
		{bfl: "final_layer.adaLN_modulation.1", out: 2 * h, in: h, diff: []string{"norm_out.linear"}, swap: true},
	}
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
// configuration, which FluxConfigFromShapes reads off a checkpoint.
func (c FluxConfig) RowMaps() ([]RowMap, error) {
	if err := c.Validate(); err != nil {
		return nil, err
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

// FluxConfigFromShapes reads a Flux configuration off a checkpoint: names
// maps each Linear weight and norm-scale tensor name, prefix already removed,
// to its logical shape (for NF4 weights, the shape in the quant state, not
// the packed bytes). Widths come from img_in/x_embedder, the first MLP and the
// QK-norm scales; block counts from the highest block index present.
func FluxConfigFromShapes(l Layout, shapes map[string][]int) (FluxConfig, error) {
	var c FluxConfig
	get := func(name string, dim int) (int, error) {
		s, ok := shapes[name]
		if !ok {
			return 0, fmt.Errorf("flux config from %s checkpoint: tensor %s missing", l, name)
		}
		if dim >= len(s) {
			return 0, fmt.Errorf("flux config from %s checkpoint: tensor %s: shape %v has no dimension %d", l, name, s, dim)
		}
		return s[dim], nil
	}
	var err error
	var names struct{ in, ctx, vec, time, guid, norm, mlp, singleFused, doublePfx, singlePfx string }
	switch l {
	case FluxBFL:
		names.in, names.ctx, names.vec, names.time, names.guid = "img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "time_in.in_layer.weight", "guidance_in.in_layer.weight"
		names.doublePfx, names.singlePfx = "double_blocks.", "single_blocks."
	case FluxDiffusers:
		names.in, names.ctx, names.vec, names.time, names.guid = "x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight", "time_text_embed.timestep_embedder.linear_1.weight", "time_text_embed.guidance_embedder.linear_1.weight"
		names.doublePfx, names.singlePfx = "transformer_blocks.", "single_transformer_blocks."
	default:
		return c, fmt.Errorf("flux config: layout %s is not a Flux layout", l)
	}
	if c.Hidden, err = get(names.in, 0); err != nil {
		return c, err
	}
	if c.InChannels, err = get(names.in, 1); err != nil {
		return c, err
	}
	if c.ContextDim, err = get(names.ctx, 1); err != nil {
		return c, err
	}
	if c.VecDim, err = get(names.vec, 1); err != nil {
		return c, err
	}
	if c.TimeDim, err = get(names.time, 1); err != nil {
		return c, err
	}
	_, c.Guidance = shapes[names.guid]
	c.DoubleBlocks = countBlocks(shapes, names.doublePfx)
	c.SingleBlocks = countBlocks(shapes, names.singlePfx)
	switch {
	case l == FluxBFL && c.DoubleBlocks > 0:
		names.mlp, names.norm = "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_attn.norm.query_norm.scale"
	case l == FluxBFL && c.SingleBlocks > 0:
		names.singleFused, names.norm = "single_blocks.0.linear1.weight", "single_blocks.0.norm.query_norm.scale"
	case l == FluxDiffusers && c.DoubleBlocks > 0:
		names.mlp, names.norm = "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.attn.norm_q.weight"
	case l == FluxDiffusers && c.SingleBlocks > 0:
		names.mlp, names.norm = "single_transformer_blocks.0.proj_mlp.weight", "single_transformer_blocks.0.attn.norm_q.weight"
	default:
		return c, fmt.Errorf("flux config from %s checkpoint: no blocks found (%s*, %s*)", l, names.doublePfx, names.singlePfx)
	}
	if names.singleFused != "" {
		var out int
		if out, err = get(names.singleFused, 0); err != nil {
			return c, err
		}
		c.MLP = out - 3*c.Hidden
	} else if c.MLP, err = get(names.mlp, 0); err != nil {
		return c, err
	}
	if c.HeadDim, err = get(names.norm, 0); err != nil {
		return c, err
	}
	if err := c.Validate(); err != nil {
		return c, fmt.Errorf("flux config from %s checkpoint: %w", l, err)
	}
	return c, nil
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
