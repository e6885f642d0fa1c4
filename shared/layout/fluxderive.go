package layout

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// FluxDerivation says where each width of a derived FluxConfig came from:
// the config field's JSON name → "tensor[dim]" (with the arithmetic, if
// any), or "absent: …" naming what was looked for. `arenahost inspect`
// prints it.
type FluxDerivation map[string]string

// fluxSource is one place a width can be read from: the tensor in each
// naming ({d} and {s} stand for any double or single block index), the
// dimension, and what to do with the number (divide by div, then subtract
// sub·hidden).
type fluxSource struct {
	bfl, diff string
	dim       int
	div       int
	subHidden int // BFL; diffSub for the diffusers name
	diffSub   int
}

func (s fluxSource) name(l Layout) string {
	if l == FluxBFL {
		return s.bfl
	}
	return s.diff
}

// The sources of each width, in order of preference. Every one is a layer
// the width is a dimension of; the first one the checkpoint has wins, so a
// model without a top-level layer (Chroma's missing vector_in, a
// blocks-only slice) still gets each width a layer it has needs.
var (
	hiddenSources = []fluxSource{
		{bfl: "img_in.weight", diff: "x_embedder.weight", dim: 0},
		{bfl: "txt_in.weight", diff: "context_embedder.weight", dim: 0},
		{bfl: "double_blocks.{d}.img_attn.proj.weight", diff: "transformer_blocks.{d}.attn.to_out.0.weight", dim: 0},
		{bfl: "double_blocks.{d}.txt_attn.proj.weight", diff: "transformer_blocks.{d}.attn.to_add_out.weight", dim: 0},
		{bfl: "double_blocks.{d}.img_attn.qkv.weight", diff: "transformer_blocks.{d}.attn.to_q.weight", dim: 1},
		{bfl: "double_blocks.{d}.txt_attn.qkv.weight", diff: "transformer_blocks.{d}.attn.add_q_proj.weight", dim: 1},
		{bfl: "double_blocks.{d}.img_mlp.2.weight", diff: "transformer_blocks.{d}.ff.net.2.weight", dim: 0},
		{bfl: "double_blocks.{d}.img_mlp.0.weight", diff: "transformer_blocks.{d}.ff.net.0.proj.weight", dim: 1},
		{bfl: "single_blocks.{s}.linear2.weight", diff: "single_transformer_blocks.{s}.proj_out.weight", dim: 0},
		{bfl: "single_blocks.{s}.linear1.weight", diff: "single_transformer_blocks.{s}.attn.to_q.weight", dim: 1},
		{bfl: "double_blocks.{d}.img_mod.lin.weight", diff: "transformer_blocks.{d}.norm1.linear.weight", dim: 1},
		{bfl: "single_blocks.{s}.modulation.lin.weight", diff: "single_transformer_blocks.{s}.norm.linear.weight", dim: 1},
		{bfl: "final_layer.linear.weight", diff: "proj_out.weight", dim: 1},
	}
	mlpSources = []fluxSource{
		{bfl: "double_blocks.{d}.img_mlp.0.weight", diff: "transformer_blocks.{d}.ff.net.0.proj.weight", dim: 0},
		{bfl: "double_blocks.{d}.img_mlp.2.weight", diff: "transformer_blocks.{d}.ff.net.2.weight", dim: 1},
		{bfl: "double_blocks.{d}.txt_mlp.0.weight", diff: "transformer_blocks.{d}.ff_context.net.0.proj.weight", dim: 0},
		{bfl: "single_blocks.{s}.linear1.weight", diff: "single_transformer_blocks.{s}.proj_mlp.weight", dim: 0, subHidden: 3},
		{bfl: "single_blocks.{s}.linear2.weight", diff: "single_transformer_blocks.{s}.proj_out.weight", dim: 1, subHidden: 1, diffSub: 1},
	}
	headSources = []fluxSource{
		{bfl: "double_blocks.{d}.img_attn.norm.query_norm.scale", diff: "transformer_blocks.{d}.attn.norm_q.weight", dim: 0},
		{bfl: "double_blocks.{d}.img_attn.norm.key_norm.scale", diff: "transformer_blocks.{d}.attn.norm_k.weight", dim: 0},
		{bfl: "single_blocks.{s}.norm.query_norm.scale", diff: "single_transformer_blocks.{s}.attn.norm_q.weight", dim: 0},
		{bfl: "single_blocks.{s}.norm.key_norm.scale", diff: "single_transformer_blocks.{s}.attn.norm_k.weight", dim: 0},
	}
	inSources      = []fluxSource{{bfl: "img_in.weight", diff: "x_embedder.weight", dim: 1}}
	outSources     = []fluxSource{{bfl: "final_layer.linear.weight", diff: "proj_out.weight", dim: 0}}
	contextSources = []fluxSource{{bfl: "txt_in.weight", diff: "context_embedder.weight", dim: 1}}
	vecSources     = []fluxSource{{bfl: "vector_in.in_layer.weight", diff: "time_text_embed.text_embedder.linear_1.weight", dim: 1}}
	timeSources    = []fluxSource{
		{bfl: "time_in.in_layer.weight", diff: "time_text_embed.timestep_embedder.linear_1.weight", dim: 1},
		{bfl: "guidance_in.in_layer.weight", diff: "time_text_embed.guidance_embedder.linear_1.weight", dim: 1},
	}
	guidanceKeys     = []fluxSource{{bfl: "guidance_in.in_layer.weight", diff: "time_text_embed.guidance_embedder.linear_1.weight"}, {bfl: "guidance_in.out_layer.weight", diff: "time_text_embed.guidance_embedder.linear_2.weight"}}
	approxInSources  = []fluxSource{{bfl: "distilled_guidance_layer.in_proj.weight", diff: "distilled_guidance_layer.in_proj.weight", dim: 1}}
	approxHidSources = []fluxSource{
		{bfl: "distilled_guidance_layer.in_proj.weight", diff: "distilled_guidance_layer.in_proj.weight", dim: 0},
		{bfl: "distilled_guidance_layer.out_proj.weight", diff: "distilled_guidance_layer.out_proj.weight", dim: 1},
		{bfl: "distilled_guidance_layer.layers.0.in_layer.weight", diff: "distilled_guidance_layer.layers.0.linear_1.weight", dim: 0},
	}
	modulationKeys = []string{".img_mod.lin.weight", ".txt_mod.lin.weight", ".modulation.lin.weight", ".norm1.linear.weight", ".norm1_context.linear.weight", ".norm.linear.weight"}
)

// FluxConfigFromShapes reads a Flux configuration off a checkpoint (see
// DeriveFlux) and drops the derivation.
func FluxConfigFromShapes(l Layout, shapes map[string][]int) (FluxConfig, error) {
	c, _, err := DeriveFlux(l, shapes)
	return c, err
}

// DeriveFlux reads a Flux-family configuration off a checkpoint from the
// layers that exist: shapes maps each Linear weight and norm-scale tensor
// name, prefix already removed, to its logical shape (for NF4 weights, the
// shape in the quant state). Each width comes from the first layer that
// has it (see the source tables above); a width no layer has is 0 and its
// derivation says "absent", which is never an error here: only the hidden
// width (every row map needs it) and at least one block are required.
// Chroma is recognised by its distilled_guidance_layer, or by blocks
// without any modulation layer and no time_in; FLUX.1 Fill/Depth/Canny by
// their in_channels; pruned models by their block counts. The result is
// what the model has: call Validate before building a full layer table.
func DeriveFlux(l Layout, shapes map[string][]int) (FluxConfig, FluxDerivation, error) {
	var c FluxConfig
	d := FluxDerivation{}
	if !l.IsFlux() {
		return c, d, fmt.Errorf("flux config: layout %s is not a Flux layout", l)
	}
	dp, sp := "double_blocks.", "single_blocks."
	if l == FluxDiffusers {
		dp, sp = "transformer_blocks.", "single_transformer_blocks."
	}
	c.DoubleBlocks, c.SingleBlocks = countBlocks(shapes, dp), countBlocks(shapes, sp)
	d["double_blocks"] = fmt.Sprintf("1 + highest N of %sN.*", dp)
	d["single_blocks"] = fmt.Sprintf("1 + highest N of %sN.*", sp)
	if c.DoubleBlocks+c.SingleBlocks == 0 {
		return c, d, fmt.Errorf("flux config from %s checkpoint: no blocks found (%s*, %s*)", l, dp, sp)
	}
	// lookup finds the first source present and returns its value.
	lookup := func(field string, srcs []fluxSource, hidden int) int {
		var tried []string
		for _, s := range srcs {
			pat := s.name(l)
			name, shape, ok := findBlockTensor(shapes, pat, c.DoubleBlocks, c.SingleBlocks)
			if !ok {
				tried = append(tried, strings.NewReplacer("{d}", "N", "{s}", "N").Replace(pat))
				continue
			}
			if s.dim >= len(shape) {
				tried = append(tried, fmt.Sprintf("%s (shape %v has no dimension %d)", name, shape, s.dim))
				continue
			}
			v, how := shape[s.dim], fmt.Sprintf("%s[%d]", name, s.dim)
			if s.div > 1 {
				v, how = v/s.div, how+"/"+strconv.Itoa(s.div)
			}
			sub := s.subHidden
			if l == FluxDiffusers {
				sub = s.diffSub
			}
			if sub > 0 {
				v -= sub * hidden
				how += fmt.Sprintf(" − %d·hidden", sub)
			}
			d[field] = how
			return v
		}
		d[field] = "absent: none of " + strings.Join(tried, ", ")
		return 0
	}
	if c.Hidden = lookup("hidden", hiddenSources, 0); c.Hidden <= 0 {
		return c, d, fmt.Errorf("flux config from %s checkpoint: no layer gives the hidden width (%s)", l, strings.TrimPrefix(d["hidden"], "absent: "))
	}
	c.MLP = lookup("mlp", mlpSources, c.Hidden)
	c.HeadDim = lookup("head_dim", headSources, 0)
	c.InChannels = lookup("in_channels", inSources, 0)
	if out := lookup("out_channels", outSources, 0); out != c.InChannels {
		c.OutCh = out
	}
	c.ContextDim = lookup("context_dim", contextSources, 0)
	c.VecDim = lookup("vec_dim", vecSources, 0)
	c.TimeDim = lookup("time_dim", timeSources, 0)
	for _, g := range guidanceKeys {
		if _, ok := shapes[g.name(l)]; ok {
			c.Guidance = true
		}
	}
	d["guidance"] = fmt.Sprintf("%s present: %v", guidanceKeys[0].name(l), c.Guidance)

	approx := countBlocks(shapes, "distilled_guidance_layer.layers.")
	hasApprox := approx > 0
	for n := range shapes {
		if strings.HasPrefix(n, "distilled_guidance_layer.") {
			hasApprox = true
			break
		}
	}
	switch {
	case hasApprox:
		c.Chroma = true
		d["chroma"] = "distilled_guidance_layer present"
	case c.VecDim == 0 && c.TimeDim == 0 && !c.Guidance && !hasModulation(shapes):
		c.Chroma = true
		d["chroma"] = "no modulation layer, no time_in/vector_in/guidance_in"
	}
	if c.Chroma {
		c.Approximator.InDim = lookup("approximator.in_dim", approxInSources, 0)
		c.Approximator.Hidden = lookup("approximator.hidden", approxHidSources, 0)
		c.Approximator.Layers = approx
		d["approximator.layers"] = "1 + highest N of distilled_guidance_layer.layers.N.*"
	}
	return c, d, nil
}

// hasModulation reports whether any block has an adaLN modulation layer.
func hasModulation(shapes map[string][]int) bool {
	for n := range shapes {
		for _, k := range modulationKeys {
			if strings.HasSuffix(n, k) && (strings.HasPrefix(n, "double_blocks.") || strings.HasPrefix(n, "single_blocks.") ||
				strings.HasPrefix(n, "transformer_blocks.") || strings.HasPrefix(n, "single_transformer_blocks.")) {
				return true
			}
		}
	}
	return false
}

// findBlockTensor resolves a source pattern: {d} and {s} range over the
// double and single block indices, lowest first.
func findBlockTensor(shapes map[string][]int, pat string, doubles, singles int) (string, []int, bool) {
	n, tok := 1, ""
	switch {
	case strings.Contains(pat, "{d}"):
		n, tok = doubles, "{d}"
	case strings.Contains(pat, "{s}"):
		n, tok = singles, "{s}"
	}
	for i := 0; i < n; i++ {
		name := pat
		if tok != "" {
			name = strings.Replace(pat, tok, strconv.Itoa(i), 1)
		}
		if s, ok := shapes[name]; ok {
			return name, s, true
		}
	}
	return "", nil, false
}

// Reference block counts and widths of FLUX.1.
const (
	flux1Hidden  = 3072
	flux1Doubles = 19
	flux1Singles = 38
)

// Variant names the Flux-family model a derived configuration describes:
// "chroma", "flux.1-dev", "flux.1-schnell", "flux.1-fill-dev" (384 input
// channels), "flux.1-depth/canny-dev" (128), with the block counts when
// they are not FLUX.1's (pruned or distilled models such as Flux.1 Lite's
// 8 double blocks) and the hidden width when it is not 3072. Shapes cannot
// tell Kontext-dev from dev (the same transformer reads its reference
// image as extra tokens); hint, a model's own name or metadata, can.
func (c FluxConfig) Variant(hint string) string {
	var v string
	switch {
	case c.Chroma:
		v = "chroma"
	case c.InChannels == 384:
		v = "flux.1-fill-dev"
	case c.InChannels == 128:
		v = "flux.1-depth/canny-dev"
	case strings.Contains(strings.ToLower(hint), "kontext"):
		v = "flux.1-kontext-dev"
	case c.Guidance:
		v = "flux.1-dev"
	default:
		v = "flux.1-schnell"
	}
	var notes []string
	if c.InChannels != 0 && c.InChannels != 64 && c.InChannels != 128 && c.InChannels != 384 {
		notes = append(notes, fmt.Sprintf("%d input channels", c.InChannels))
	}
	if c.DoubleBlocks != flux1Doubles || c.SingleBlocks != flux1Singles {
		notes = append(notes, fmt.Sprintf("%d double + %d single blocks, pruned or distilled (FLUX.1 has %d + %d)", c.DoubleBlocks, c.SingleBlocks, flux1Doubles, flux1Singles))
	}
	if c.Hidden != flux1Hidden {
		notes = append(notes, fmt.Sprintf("hidden %d (FLUX.1 has %d)", c.Hidden, flux1Hidden))
	}
	if len(notes) > 0 {
		v += " (" + strings.Join(notes, "; ") + ")"
	}
	return v
}

// Fields lists the derivation's entries sorted by field name.
func (d FluxDerivation) Fields() []string {
	out := make([]string, 0, len(d))
	for k := range d {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
