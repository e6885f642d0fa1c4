// Package checkpoint owns what a model on disk is beyond its tensors: the
// container it comes in (a file, a diffusers model folder, a pipeline
// folder: safetensors.Set), the layout and Flux-family variant its layers
// say it is, what each width was derived from, and whether the diffusers
// config.json beside the weights agrees with them. The registry refuses a
// model whose config disagrees; inspect reports all of it.
package checkpoint

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Description is what Describe learns about a model.
type Description struct {
	Container safetensors.Container `json:"container"`
	Component string                `json:"component,omitempty"` // pipeline component used
	Shards    int                   `json:"shards"`
	Config    string                `json:"config,omitempty"`     // config.json path
	Class     string                `json:"class_name,omitempty"` // config.json _class_name
	// Layout is the detected layout; LayoutError says why none was.
	Layout      layout.Info `json:"layout"`
	LayoutError string      `json:"layout_error,omitempty"`
	// Flux is the Flux-family configuration derived from the layers
	// present, DerivedFrom where each width came from, Variant its name.
	Flux        *layout.FluxConfig    `json:"flux,omitempty"`
	DerivedFrom layout.FluxDerivation `json:"derived_from,omitempty"`
	Variant     string                `json:"variant,omitempty"`
	// Components are the models a single file bundles (Forge/ComfyUI:
	// diffusion model, text encoders, VAE), or a pipeline folder's text
	// encoders and VAE carried beside its transformer (OpenModel), in
	// file order; nil for a bare model.
	Components []Component `json:"components,omitempty"`
	Warnings   []string    `json:"warnings,omitempty"`
}

// Component is one bundled model and what its tensors are stored as.
type Component struct {
	Kind    string         `json:"kind"` // diffusion, te1, te2, t5, vae
	Label   string         `json:"label"`
	Prefix  string         `json:"prefix"`
	Tensors int            `json:"tensors"`
	Bytes   int64          `json:"bytes"`
	Weights int            `json:"weights_4bit"` // bitsandbytes 4-bit weights
	DTypes  map[string]int `json:"dtypes"`       // stored tensors per safetensors dtype
	// Source is the pipeline component folder it was read from
	// (OpenModel), Shards its files; empty / 0 for a single file's.
	Source string `json:"source,omitempty"`
	Shards int    `json:"shards,omitempty"`
}

// Describe describes the model s holds; weights are its 4-bit weights
// (nf4.GroupWeights), whose logical shapes stand for their packed bytes.
// The error is a config.json that disagrees with the weights, naming each
// field; a layout that cannot be detected is not an error (LayoutError).
func Describe(s *safetensors.Set, weights []nf4.Weight) (*Description, error) {
	d := &Description{Container: s.Container, Component: s.Component, Shards: s.ModelFiles(), Config: s.ConfigPath}
	logical := map[string][]int64{}
	for _, w := range weights {
		logical[w.Name] = w.State.Shape
	}
	names := make([]string, 0, len(s.Tensors))
	for _, t := range s.Tensors {
		names = append(names, t.Name)
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		d.LayoutError = err.Error()
	}
	d.Layout = info
	d.Components = components(s, weights)
	var cfg map[string]any
	if s.Config != nil {
		if err := json.Unmarshal(s.Config, &cfg); err != nil {
			return d, fmt.Errorf("%s: %w", s.ConfigPath, err)
		}
		d.Class, _ = cfg["_class_name"].(string)
	}
	shapes := shapeSet{}
	for _, t := range s.Tensors {
		if layout.IsQuantSideKey(t.Name) {
			continue
		}
		p, ok := strings.CutPrefix(t.Name, info.Prefix)
		if !ok {
			continue
		}
		shape := t.Shape
		if l, ok := logical[t.Name]; ok {
			shape = l
		}
		ints := make([]int, len(shape))
		for i, v := range shape {
			ints[i] = int(v)
		}
		shapes[p] = ints
	}
	if info.Layout.IsFlux() {
		c, der, err := layout.DeriveFlux(info.Layout, shapes)
		if err != nil {
			d.Warnings = append(d.Warnings, err.Error())
		} else {
			d.Flux, d.DerivedFrom = &c, der
			hint := d.Class
			for _, k := range []string{"modelspec.architecture", "modelspec.title"} {
				hint += " " + s.Metadata[k]
			}
			if cfg != nil {
				if n, ok := cfg["_name_or_path"].(string); ok {
					hint += " " + n
				}
			}
			d.Variant = c.Variant(hint)
		}
	}
	if cfg != nil {
		var bad []string
		bad = append(bad, classMismatch(cfg, info.Layout)...)
		if d.Flux != nil {
			bad = append(bad, fluxMismatches(cfg, *d.Flux, info.Layout)...)
		}
		if info.Naming == layout.NamingDiffusers {
			switch info.Layout {
			case layout.SDXL, layout.SD15:
				bad = append(bad, unetMismatches(cfg, shapes)...)
			case layout.SD3:
				bad = append(bad, sd3Mismatches(cfg, shapes)...)
			}
		}
		bad = append(bad, quantMismatches(cfg, modelWeights(weights))...)
		if len(bad) > 0 {
			return d, fmt.Errorf("%s disagrees with the weights: %s", s.ConfigPath, strings.Join(bad, "; "))
		}
		if _, ok := cfg["quantization_config"]; !ok && len(modelWeights(weights)) > 0 {
			d.Warnings = append(d.Warnings, fmt.Sprintf("%s has no quantization_config although the weights are bitsandbytes 4-bit: diffusers will not load the folder as it is", s.ConfigPath))
		}
	}
	return d, nil
}

// modelWeights are the 4-bit weights of the diffusion model: weights
// without a text-encoder or VAE component prefix (a pipeline folder's
// encoders, carried beside its transformer, have their own config).
func modelWeights(weights []nf4.Weight) []nf4.Weight {
	var out []nf4.Weight
	for _, w := range weights {
		if c, _, ok := layout.ComponentOf(w.Name); ok && c.Kind != "diffusion" {
			continue
		}
		out = append(out, w)
	}
	return out
}

// components groups the tensors by bundled component; nil when none has a
// component prefix. A pipeline folder's component says which folder it
// was read from (Source).
func components(s *safetensors.Set, weights []nf4.Weight) []Component {
	four := map[string]bool{}
	for _, w := range weights {
		four[w.Name] = true
	}
	var out []Component
	at := map[string]int{}
	for _, t := range s.Tensors {
		c, pre, ok := layout.ComponentOf(t.Name)
		if !ok {
			continue
		}
		i, seen := at[c.Kind+pre]
		if !seen {
			i = len(out)
			at[c.Kind+pre] = i
			out = append(out, Component{Kind: c.Kind, Label: c.Label, Prefix: pre, DTypes: map[string]int{}})
			for _, sc := range s.Components {
				if strings.HasPrefix(t.Name, sc.Prefix) {
					out[i].Source, out[i].Shards = sc.Dir, len(sc.Files)
				}
			}
		}
		out[i].Tensors++
		out[i].Bytes += t.End - t.Begin
		out[i].DTypes[string(t.DType)]++
		if four[t.Name] {
			out[i].Weights++
		}
	}
	return out
}

// fluxMismatches compares the diffusers FluxTransformer2DModel /
// ChromaTransformer2DModel config fields present with the configuration
// the weights give.
func fluxMismatches(cfg map[string]any, c layout.FluxConfig, l layout.Layout) []string {
	dp, sp := "transformer_blocks.N", "single_transformer_blocks.N"
	if l == layout.FluxBFL {
		dp, sp = "double_blocks.N", "single_blocks.N"
	}
	type check struct {
		key  string
		have int
		what string
	}
	checks := []check{
		{"num_layers", c.DoubleBlocks, "double blocks (" + dp + ")"},
		{"num_single_layers", c.SingleBlocks, "single blocks (" + sp + ")"},
		{"in_channels", c.InChannels, "input channels (x_embedder/img_in)"},
		{"joint_attention_dim", c.ContextDim, "context width (context_embedder/txt_in)"},
		{"pooled_projection_dim", c.VecDim, "pooled width (text_embedder/vector_in)"},
	}
	if c.OutCh > 0 {
		checks = append(checks, check{"out_channels", c.OutCh, "output channels (proj_out/final_layer.linear)"})
	}
	if c.Chroma {
		checks = append(checks,
			check{"approximator_num_channels", c.Approximator.InDim, "approximator input width (distilled_guidance_layer.in_proj)"},
			check{"approximator_hidden_dim", c.Approximator.Hidden, "approximator width"},
			check{"approximator_layers", c.Approximator.Layers, "approximator layers"})
	}
	var bad []string
	for _, ch := range checks {
		v, ok := cfg[ch.key].(float64)
		if !ok || ch.have == 0 {
			continue // absent from the config, or no layer of the weights has it
		}
		if int(v) != ch.have {
			bad = append(bad, fmt.Sprintf("%s = %d but the weights have %d %s", ch.key, int(v), ch.have, ch.what))
		}
	}
	heads, ok1 := cfg["num_attention_heads"].(float64)
	hd, ok2 := cfg["attention_head_dim"].(float64)
	if ok1 && ok2 && int(heads*hd) != c.Hidden {
		bad = append(bad, fmt.Sprintf("num_attention_heads × attention_head_dim = %d × %d = %d but the weights' hidden width is %d", int(heads), int(hd), int(heads*hd), c.Hidden))
	}
	if ok2 && c.HeadDim > 0 && int(hd) != c.HeadDim {
		bad = append(bad, fmt.Sprintf("attention_head_dim = %d but the QK-norm scales are %d wide", int(hd), c.HeadDim))
	}
	if g, ok := cfg["guidance_embeds"].(bool); ok && g != c.Guidance {
		bad = append(bad, fmt.Sprintf("guidance_embeds = %v but guidance_in/guidance_embedder is %s", g, map[bool]string{true: "present", false: "absent"}[c.Guidance]))
	}
	cls, _ := cfg["_class_name"].(string)
	if strings.HasPrefix(cls, "Chroma") != c.Chroma && strings.HasSuffix(cls, "Transformer2DModel") && (strings.HasPrefix(cls, "Flux") || strings.HasPrefix(cls, "Chroma")) {
		what := "modulation layers and no distilled_guidance_layer (FLUX.1)"
		if c.Chroma {
			what = "Chroma's distilled_guidance_layer and no modulation layers"
		}
		bad = append(bad, fmt.Sprintf("_class_name = %s but the weights have %s", cls, what))
	}
	return bad
}

// quantMismatches compares quantization_config with the 4-bit weights.
func quantMismatches(cfg map[string]any, weights []nf4.Weight) []string {
	q, ok := cfg["quantization_config"].(map[string]any)
	if !ok {
		return nil
	}
	var bad []string
	if m, _ := q["quant_method"].(string); m != "" && m != "bitsandbytes" {
		return []string{fmt.Sprintf("quantization_config.quant_method = %q; arenahost reads bitsandbytes 4-bit weights", m)}
	}
	four, _ := q["load_in_4bit"].(bool)
	if four && len(weights) == 0 {
		return []string{"quantization_config.load_in_4bit = true but no weight carries a bitsandbytes 4-bit quant state"}
	}
	if !four && len(weights) > 0 {
		return []string{fmt.Sprintf("quantization_config.load_in_4bit is not true but %d weights are bitsandbytes 4-bit", len(weights))}
	}
	types, nested := map[string]int{}, map[bool]int{}
	for _, w := range weights {
		types[string(w.State.QuantType)]++
		nested[w.State.Nested]++
	}
	if qt, ok := q["bnb_4bit_quant_type"].(string); ok && (len(types) != 1 || types[qt] == 0) {
		bad = append(bad, fmt.Sprintf("quantization_config.bnb_4bit_quant_type = %q but the weights are %s", qt, counts(types)))
	}
	if dq, ok := q["bnb_4bit_use_double_quant"].(bool); ok && (len(nested) != 1 || nested[dq] == 0) {
		bad = append(bad, fmt.Sprintf("quantization_config.bnb_4bit_use_double_quant = %v but %d weights are nested and %d plain", dq, nested[true], nested[false]))
	}
	return bad
}

func counts(m map[string]int) string {
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%d %s", v, k))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}
