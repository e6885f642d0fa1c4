package lora

import (
	"github.com/arenahost/arenahost/shared/lora/lorareport"

	"fmt"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/arenahost/arenahost/shared/layout"
)

// Layer is one Linear (or conv, kernels flattened into In) layer of the
// target model. Name is the weight key minus ".weight", prefix included
// ("model.diffusion_model.double_blocks.0.img_attn.qkv").
type Layer struct {
	Name string `json:"name" msgpack:"name"`
	Out  int    `json:"out" msgpack:"out"`
	In   int    `json:"in" msgpack:"in"`
}

// Piece places rows [SrcRow, SrcRow+Rows) of a module's ΔW at rows
// [DstRow, DstRow+Rows) of Layer. A module on a layer of the same naming has
// one piece covering all rows; a fused module on a split model has one piece
// per part (A shared, B split by rows); split modules on a fused model land
// at row offsets (block-diagonal B in the concatenation).
type Piece struct {
	Layer  string `json:"layer" msgpack:"layer"`
	DstRow int    `json:"dst_row" msgpack:"dst_row"`
	SrcRow int    `json:"src_row" msgpack:"src_row"`
	Rows   int    `json:"rows" msgpack:"rows"`
}

// Model is a target model's layer set with the index that resolves LoRA
// module keys in any supported naming onto its layers.
type Model struct {
	Info   layout.Info
	Flux   *layout.FluxConfig // nil for UNet models
	layers map[string]Layer
	names  []string
	index  map[string][]Piece // component + ":" + flattened alias
	// hasComp: components with 4-bit layers in the index; bundled: the
	// components the checkpoint carries at all (NoteTensors), with an
	// example tensor.
	hasComp map[string]bool
	bundled map[string]string
}

// NoteTensors records which bundled components (text encoders, VAE) the
// checkpoint carries among all its tensor names, 4-bit or not, so an
// unmatched text-encoder key says whether the encoder is absent or present
// but not stored in a form LoRAs apply to (bitsandbytes 4-bit, or plain
// F32/F16/BF16/F8 2-D weights when the caller lists those as layers).
func (m *Model) NoteTensors(names []string) {
	for _, n := range names {
		if c, _, ok := layout.ComponentOf(n); ok {
			if _, seen := m.bundled[c.Kind]; !seen {
				m.bundled[c.Kind] = n
			}
		}
	}
}

// Component prefixes in the alias index.
const (
	compDiffusion = "unet"
	compTE1       = "te1"
	compTE2       = "te2"
	compTE3       = "t5"
)

// teComp is the alias-index component of each text encoder.
var teComp = map[layout.TextEncoder]string{layout.TE1: compTE1, layout.TE2: compTE2, layout.TE3: compTE3}

// NewModel builds the mapping index for a model. layers are all its Linear
// layers (logical shapes); info comes from layout.DetectInfo on the same
// checkpoint. Flux split sizes are derived from the layers' shapes.
func NewModel(info layout.Info, layers []Layer) (*Model, error) {
	m := &Model{Info: info, layers: map[string]Layer{}, index: map[string][]Piece{}, hasComp: map[string]bool{}, bundled: map[string]string{}}
	for _, l := range layers {
		if l.Out <= 0 || l.In <= 0 {
			return nil, fmt.Errorf("lora model: layer %s: shape [%d %d]", l.Name, l.Out, l.In)
		}
		if _, dup := m.layers[l.Name]; dup {
			return nil, fmt.Errorf("lora model: layer %s listed twice", l.Name)
		}
		m.layers[l.Name] = l
		m.names = append(m.names, l.Name)
	}
	sort.Strings(m.names)
	add := func(comp, alias string, p Piece) {
		k := comp + ":" + layout.KohyaName("", alias)
		for _, q := range m.index[k] {
			if q == p { // a layer named alike in both namings (Chroma's distilled_guidance_layer.in_proj)
				return
			}
		}
		m.index[k] = append(m.index[k], p)
	}
	diffusion := map[string]Layer{} // module path without prefix → layer
	for _, n := range m.names {
		l := m.layers[n]
		if path, ok := strings.CutPrefix(n, info.Prefix); ok && (info.Prefix != "" || !isTextEncoder(n)) {
			diffusion[path] = l
			add(compDiffusion, path, Piece{Layer: n, Rows: l.Out})
			continue
		}
		for _, te := range []layout.TextEncoder{layout.TE1, layout.TE2, layout.TE3} {
			for _, pre := range layout.TextEncoderPrefixes(te) {
				if path, ok := strings.CutPrefix(n, pre); ok {
					add(teComp[te], path, Piece{Layer: n, Rows: l.Out})
					if te != layout.TE3 && strings.HasPrefix(path, "encoder.layers.") {
						// transformers 5 saves a CLIP text model (a pipeline folder's
						// text_encoder/) without text_model.; LoRA keys name it with it.
						add(teComp[te], "text_model."+path, Piece{Layer: n, Rows: l.Out})
					}
					m.hasComp[teComp[te]] = true
				}
			}
		}
	}
	switch {
	case info.Layout.IsFlux():
		shapes := map[string][]int{}
		for p, l := range diffusion {
			shapes[p+".weight"] = []int{l.Out, l.In}
		}
		// Only the widths of the layers present matter: DeriveFlux reads
		// each off a layer that has it and leaves absent ones 0 (Chroma
		// has no vector_in; a slice of blocks has no top level at all).
		cfg, _, err := layout.DeriveFlux(info.Layout, shapes)
		if err != nil {
			return nil, fmt.Errorf("lora model: %w", err)
		}
		m.Flux = &cfg
		maps, err := cfg.RowMaps()
		if err != nil {
			return nil, fmt.Errorf("lora model: %w", err)
		}
		for _, r := range maps {
			if info.Layout == layout.FluxBFL {
				if _, ok := diffusion[r.BFL]; ok {
					add(compDiffusion, r.Diffusers, Piece{Layer: info.Prefix + r.BFL, DstRow: r.BFLRow, SrcRow: r.DiffRow, Rows: r.Rows})
				}
			} else if _, ok := diffusion[r.Diffusers]; ok {
				add(compDiffusion, r.BFL, Piece{Layer: info.Prefix + r.Diffusers, DstRow: r.DiffRow, SrcRow: r.BFLRow, Rows: r.Rows})
			}
		}
	case info.Layout == layout.SD3 && info.Naming == layout.NamingDiffusers:
		// kohya's SD3 LoRAs name Stability's modules (joint_blocks…,
		// fused qkv); on a diffusers-named model they land by the row maps.
		// (A SAI-named model takes SAI-named keys by their own names.)
		blocks := countPrefix(diffusion, "transformer_blocks.")
		rows := func(d string) (int, bool) {
			l, ok := diffusion[d]
			return l.Out, ok
		}
		for _, r := range layout.SD3RowMaps(blocks, rows) {
			add(compDiffusion, r.BFL, Piece{Layer: info.Prefix + r.Diffusers, DstRow: r.DiffRow, SrcRow: r.BFLRow, Rows: r.Rows})
		}
	case info.Layout == layout.SDXL || info.Layout == layout.SD15:
		for p := range diffusion {
			l := diffusion[p]
			other, ok := layout.UNetToDiffusers(info.Layout, p)
			if info.Naming == layout.NamingDiffusers {
				other, ok = layout.UNetToLDM(info.Layout, p)
			}
			if ok {
				add(compDiffusion, other, Piece{Layer: info.Prefix + p, Rows: l.Out})
			}
		}
	}
	return m, nil
}

// countPrefix returns 1 + the highest N among module paths "<prefix>N.…".
func countPrefix(ls map[string]Layer, prefix string) int {
	n := 0
	for p := range ls {
		rest, ok := strings.CutPrefix(p, prefix)
		if !ok {
			continue
		}
		idx, _, _ := strings.Cut(rest, ".")
		if i, err := strconv.Atoi(idx); err == nil && i+1 > n {
			n = i + 1
		}
	}
	return n
}

func isTextEncoder(name string) bool {
	for _, te := range []layout.TextEncoder{layout.TE1, layout.TE2, layout.TE3} {
		for _, pre := range layout.TextEncoderPrefixes(te) {
			if strings.HasPrefix(name, pre) {
				return true
			}
		}
	}
	return false
}

// Layer returns the layer called name.
func (m *Model) Layer(name string) (Layer, bool) {
	l, ok := m.layers[name]
	return l, ok
}

// Layers returns the model's layer names, sorted.
func (m *Model) Layers() []string { return m.names }

// Unmatched is a module or key that maps onto no layer, with the reason
// (lorareport's).
type Unmatched = lorareport.Unmatched

// Target is one module placed on the model.
type Target struct {
	Module *Module `json:"module" msgpack:"module"`
	Pieces []Piece `json:"pieces" msgpack:"pieces"`
}

// Mapping is a LoRA file placed on a model.
type Mapping struct {
	File      *File       `json:"file" msgpack:"file"`
	Targets   []Target    `json:"targets" msgpack:"targets"`
	Unmatched []Unmatched `json:"unmatched" msgpack:"unmatched"`
}

// xlabs rewrites XLabs processor names to BFL module paths; partial marks
// the single-block qkv, which covers only the first rows of linear1.
var xlabs = []struct {
	from, to string
	partial  bool
}{
	{".processor.qkv_lora1", ".img_attn.qkv", false}, {".processor.qkv_lora2", ".txt_attn.qkv", false},
	{".processor.proj_lora1", ".img_attn.proj", false}, {".processor.proj_lora2", ".txt_attn.proj", false},
	{".processor.qkv_lora", ".linear1", true}, {".processor.proj_lora", ".linear2", false},
}

// resolve turns a module key into (component, module path or flattened
// name, partial).
func resolve(key string) (comp, path string, partial bool) {
	for _, p := range []struct{ pre, comp string }{
		{"lora_unet_", compDiffusion}, {"lora_transformer_", compDiffusion}, {"lycoris_", compDiffusion},
		{"lora_te1_", compTE1}, {"lora_te2_", compTE2}, {"lora_te3_", compTE3}, {"lora_te_", compTE1},
	} {
		if rest, ok := strings.CutPrefix(key, p.pre); ok {
			return p.comp, rest, false
		}
	}
	comp, path = compDiffusion, key
	for _, p := range []struct{ pre, comp string }{
		{"base_model.model.", compDiffusion}, {"model.diffusion_model.", compDiffusion}, {"diffusion_model.", compDiffusion},
		{"transformer.", compDiffusion}, {"unet.", compDiffusion},
		{"text_encoders.clip_l.transformer.", compTE1}, {"text_encoders.t5xxl.transformer.", compTE3},
		{"text_encoder_3.", compTE3}, {"text_encoder_2.", compTE2}, {"text_encoder.", compTE1},
	} {
		if rest, ok := strings.CutPrefix(key, p.pre); ok {
			comp, path = p.comp, rest
			break
		}
	}
	for _, x := range xlabs {
		if rest, ok := strings.CutSuffix(path, x.from); ok {
			return comp, rest + x.to, x.partial
		}
	}
	// Old diffusers attention-processor LoRAs: attn1.processor.to_q_lora.
	if rest, ok := strings.CutSuffix(path, ".processor.to_out"); ok {
		return comp, rest + ".to_out.0", false
	}
	if i := strings.LastIndex(path, ".processor."); i >= 0 {
		return comp, path[:i] + path[i+len(".processor"):], false
	}
	return comp, path, false
}

// Map places every module of f on the model. Modules and keys that match no
// layer are listed in Unmatched; a module that matches but does not fit
// (in-features, rows) is an error naming the file and key, since applying
// it anyway would be wrong and skipping it silent.
func (m *Model) Map(f *File) (*Mapping, error) {
	out := &Mapping{File: f}
	name := filepath.Base(f.Path)
	for _, k := range f.Unknown {
		out.Unmatched = append(out.Unmatched, Unmatched{Key: k, Reason: "unknown key suffix"})
	}
	for _, mod := range f.Modules {
		comp, path, partial := resolve(mod.Key)
		pieces := m.index[comp+":"+layout.KohyaName("", path)]
		if len(pieces) == 0 {
			out.Unmatched = append(out.Unmatched, Unmatched{Key: mod.Key, Reason: m.unmatchedReason(comp, path)})
			continue
		}
		var kept []Piece
		rows := 0
		for _, p := range pieces {
			if partial {
				if p.SrcRow >= mod.Out {
					continue
				}
				if p.SrcRow+p.Rows > mod.Out {
					p.Rows = mod.Out - p.SrcRow
				}
			}
			kept = append(kept, p)
			rows += p.Rows
		}
		sort.Slice(kept, func(i, j int) bool { return kept[i].SrcRow < kept[j].SrcRow })
		if rows != mod.Out {
			return nil, fmt.Errorf("map lora %s: key %s: module has %d output rows but layer(s) %s have %d", name, mod.keys[0], mod.Out, pieceNames(kept), rows)
		}
		for _, p := range kept {
			l := m.layers[p.Layer]
			if l.In != mod.In {
				return nil, fmt.Errorf("map lora %s: key %s: in-features %d but layer %s has %d", name, mod.keys[0], mod.In, p.Layer, l.In)
			}
			if p.DstRow+p.Rows > l.Out {
				return nil, fmt.Errorf("map lora %s: key %s: rows %d..%d outside layer %s (%d rows)", name, mod.keys[0], p.DstRow, p.DstRow+p.Rows, p.Layer, l.Out)
			}
		}
		out.Targets = append(out.Targets, Target{Module: mod, Pieces: kept})
	}
	return out, nil
}

// unmatchedReason says why a module of component comp found no layer.
func (m *Model) unmatchedReason(comp, path string) string {
	if comp == compDiffusion || m.hasComp[comp] {
		return fmt.Sprintf("no %s layer named %s in this %s model", comp, path, m.Info.Layout)
	}
	kind := comp
	label := layout.ComponentLabel(kind)
	if ex, ok := m.bundled[kind]; ok {
		return fmt.Sprintf("text-encoder key: the checkpoint bundles %s (e.g. %s) but has no layer of it the key names stored in bitsandbytes 4-bit or as a plain 2-D F32/F16/BF16/F8_E4M3/F8_E5M2 weight, which side and fused applies (and merge) write LoRAs into", label, ex)
	}
	return fmt.Sprintf("text-encoder key: the checkpoint bundles no %s", label)
}

func pieceNames(ps []Piece) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.Layer)
	}
	return strings.Join(s, ", ")
}

// Strict returns an error listing every unmatched key (apply --strict).
func (mp *Mapping) Strict() error {
	if len(mp.Unmatched) == 0 {
		return nil
	}
	var keys []string
	for _, u := range mp.Unmatched {
		keys = append(keys, u.Key+" ("+u.Reason+")")
	}
	return fmt.Errorf("lora %s: %d unmatched keys under --strict: %s", filepath.Base(mp.File.Path), len(keys), strings.Join(keys, "; "))
}
