// Package inspect owns the description of a safetensors file on disk without
// loading it into the arena: whether it is a model checkpoint (plain
// safetensors or bitsandbytes NF4/FP4, nested or not, and which layout) or a
// LoRA (key format, network types, ranks, alphas, targets, base model). The
// CLI's `inspect` command and the HTTP LoRA listing both use it.
package inspect

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/arenahost/arenahost/shared/checkpoint"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Kind says what a file holds.
type Kind string

// Kinds of file.
const (
	KindModel Kind = "model"
	KindLoRA  Kind = "lora"
)

// Report describes one file.
type Report struct {
	Path  string      `json:"path"`
	Kind  Kind        `json:"kind"`
	Model *ModelInfo  `json:"model,omitempty"`
	LoRA  *LoRAReport `json:"lora,omitempty"`
}

// ModelInfo describes a checkpoint.
type ModelInfo struct {
	// Format is "bnb-nf4", "bnb-fp4" or "safetensors".
	Format    string `json:"format"`
	Nested    bool   `json:"nested"`
	Blocksize int    `json:"blocksize,omitempty"`
	DType     string `json:"dtype,omitempty"` // logical dtype of the quantized weights
	Layout    string `json:"layout"`
	Prefix    string `json:"prefix,omitempty"`
	Tensors   int    `json:"tensors"`    // stored tensors
	Weights   int    `json:"weights"`    // 4-bit weights (each one registry entry)
	Entries   int    `json:"entries"`    // registry entries: 4-bit weights plus plain tensors
	Params    int64  `json:"params"`     // logical parameters
	Bytes     int64  `json:"bytes"`      // stored bytes of tensor data
	FileBytes int64  `json:"file_bytes"` // all shards
	// Container is "file", "model-folder" or "pipeline-folder"; Component
	// the pipeline component read; Shards the files; Config config.json
	// and Class its _class_name.
	Container string `json:"container"`
	Component string `json:"component,omitempty"`
	Shards    int    `json:"shards"`
	Config    string `json:"config,omitempty"`
	Class     string `json:"class_name,omitempty"`
	// Variant is the Flux-family model recognised, Flux the configuration
	// derived from the layers present and DerivedFrom where each width
	// came from.
	Variant     string                 `json:"variant,omitempty"`
	Components  []checkpoint.Component `json:"components,omitempty"`
	Flux        *layout.FluxConfig     `json:"flux,omitempty"`
	DerivedFrom layout.FluxDerivation  `json:"derived_from,omitempty"`
	Blocksizes  []int                  `json:"blocksizes,omitempty"`
	Warnings    []string               `json:"warnings,omitempty"`
}

// LoRAReport describes a LoRA file: shared/lora's summary of it.
type LoRAReport = lora.Summary

// File inspects the model or LoRA at path: a safetensors file, or a
// diffusers model or pipeline folder (safetensors.OpenSet).
func File(path string) (*Report, error) {
	f, notes, err := checkpoint.OpenModel(path) // a pipeline folder's encoders and VAE too
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(f.Tensors))
	for _, t := range f.Tensors {
		names = append(names, t.Name)
	}
	isLoRA := f.Container == safetensors.ContainerFile && looksLikeLoRA(names)
	if isLoRA {
		f.Close()
		return inspectLoRA(path)
	}
	defer f.Close()
	r, err := inspectModel(path, f, names)
	if r != nil && r.Model != nil {
		r.Model.Warnings = append(r.Model.Warnings, notes...)
	}
	return r, err
}

// looksLikeLoRA reports whether the names are those of a LoRA/LyCORIS file.
func looksLikeLoRA(names []string) bool {
	for _, n := range names {
		for _, m := range []string{"lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", ".lora.down", ".lora.up", "_lora1.down", "_lora2.down", ".lora_linear_layer."} {
			if strings.Contains(n, m) {
				return true
			}
		}
	}
	return false
}

func inspectModel(path string, f *safetensors.Set, names []string) (*Report, error) {
	meta := make(map[string]nf4.TensorMeta, len(f.Tensors))
	var data int64
	for _, t := range f.Tensors {
		meta[t.Name] = nf4.TensorMeta{DType: string(t.DType), Shape: t.Shape}
		data += t.NBytes()
	}
	weights, plain, err := nf4.GroupWeights(path, meta, f.Data)
	if err != nil {
		return nil, err
	}
	info := &ModelInfo{Format: "safetensors", Tensors: len(f.Tensors), Weights: len(weights),
		Entries: len(weights) + len(plain), Bytes: data, FileBytes: f.FileBytes()}
	desc, derr := checkpoint.Describe(f, weights)
	info.Container, info.Component, info.Shards, info.Config, info.Class = string(desc.Container), desc.Component, desc.Shards, desc.Config, desc.Class
	info.Variant, info.Flux, info.DerivedFrom, info.Components = desc.Variant, desc.Flux, desc.DerivedFrom, desc.Components
	if desc.LayoutError == "" {
		info.Layout, info.Prefix = desc.Layout.Layout.String(), desc.Layout.Prefix
	} else {
		info.Layout = layout.Unknown.String()
		info.Warnings = append(info.Warnings, desc.LayoutError)
	}
	info.Warnings = append(info.Warnings, desc.Warnings...)
	if derr != nil {
		info.Warnings = append(info.Warnings, "will not load: "+derr.Error())
	}
	bs := map[int]bool{}
	for i, w := range weights {
		if i == 0 {
			info.Format = "bnb-" + string(w.State.QuantType)
			info.Nested, info.Blocksize, info.DType = w.State.Nested, w.State.Blocksize, string(w.State.DType)
		}
		bs[w.State.Blocksize] = true
		info.Params += int64(w.Numel())
	}
	for b := range bs {
		info.Blocksizes = append(info.Blocksizes, b)
	}
	sort.Ints(info.Blocksizes)
	for _, n := range plain {
		t, _ := f.Lookup(n)
		info.Params += t.NumElements()
	}
	return &Report{Path: path, Kind: KindModel, Model: info}, nil
}

func inspectLoRA(path string) (*Report, error) {
	lf, err := lora.Parse(path)
	if err != nil {
		return nil, err
	}
	sum := lora.Summarize(lf)
	return &Report{Path: path, Kind: KindLoRA, LoRA: &sum}, nil
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report for a person.
func (r *Report) WriteText(w io.Writer) error {
	p := func(k string, v any) { fmt.Fprintf(w, "%-14s %v\n", k+":", v) }
	p("file", r.Path)
	switch r.Kind {
	case KindModel:
		m := r.Model
		format := m.Format
		if strings.HasPrefix(format, "bnb-") {
			nest := "plain"
			if m.Nested {
				nest = "nested"
			}
			format = fmt.Sprintf("%s %s, blocksize %d, dtype %s", format, nest, m.Blocksize, m.DType)
		}
		p("format", format)
		layoutText := m.Layout
		if m.Prefix != "" {
			layoutText += fmt.Sprintf(" (prefix %q)", m.Prefix)
		}
		p("layout", layoutText)
		container := m.Container
		if m.Component != "" {
			container += ", component " + m.Component + "/"
		}
		if m.Shards > 1 {
			container += fmt.Sprintf(", %d shards", m.Shards)
		}
		if m.Config != "" {
			container += ", " + m.Config
			if m.Class != "" {
				container += " (" + m.Class + ")"
			}
		}
		p("container", container)
		for i, c := range m.Components {
			var dts []string
			for dt, n := range c.DTypes {
				dts = append(dts, fmt.Sprintf("%d %s", n, dt))
			}
			sort.Strings(dts)
			label := ""
			if i == 0 {
				label = "components"
			}
			from := ""
			if c.Source != "" {
				from = " from " + c.Source
			}
			fmt.Fprintf(w, "%-14s %s under %q%s: %d tensors (%s), %s, %d 4-bit weights\n", label, c.Label, c.Prefix, from, c.Tensors, strings.Join(dts, ", "), humanBytes(c.Bytes), c.Weights)
		}
		if m.Variant != "" {
			p("variant", m.Variant)
			c := m.Flux
			p("flux", fmt.Sprintf("hidden %d, head_dim %d, mlp %d, in %d, out %d, context %d, vec %d, time %d, %d double + %d single blocks, guidance %v",
				c.Hidden, c.HeadDim, c.MLP, c.InChannels, c.OutChannels(), c.ContextDim, c.VecDim, c.TimeDim, c.DoubleBlocks, c.SingleBlocks, c.Guidance))
			if c.Chroma {
				p("approximator", fmt.Sprintf("in %d, hidden %d, %d layers", c.Approximator.InDim, c.Approximator.Hidden, c.Approximator.Layers))
			}
			first := true
			for _, k := range m.DerivedFrom.Fields() {
				label := ""
				if first {
					label, first = "derived from", false
				}
				fmt.Fprintf(w, "%-14s %s ← %s\n", label, k, m.DerivedFrom[k])
			}
		}
		p("tensors", fmt.Sprintf("%d stored, %d registry entries (%d 4-bit weights)", m.Tensors, m.Entries, m.Weights))
		p("parameters", humanCount(m.Params))
		p("bytes", fmt.Sprintf("%s of tensor data, %s file", humanBytes(m.Bytes), humanBytes(m.FileBytes)))
		for _, wn := range m.Warnings {
			p("warning", wn)
		}
	case KindLoRA:
		l := r.LoRA
		p("format", "LoRA, "+string(l.Format)+" keys")
		types := make([]string, 0, len(l.Types))
		for _, t := range l.Types {
			types = append(types, string(t))
		}
		if l.DoRA {
			types = append(types, "dora")
		}
		p("networks", strings.Join(types, ", "))
		p("ranks", l.Ranks)
		p("alphas", l.Alphas)
		p("scales", l.Scales)
		base := strings.TrimSpace(l.BaseModel + " " + l.Architecture)
		if base == "" {
			base = "(not recorded)"
		}
		p("trained for", base)
		p("target names", l.Layout)
		p("modules", l.Modules)
		show := l.Targets
		if len(show) > 8 {
			show = append(append([]string{}, show[:8]...), fmt.Sprintf("… %d more", len(l.Targets)-8))
		}
		p("targets", strings.Join(show, "\n               "))
		if len(l.Unknown) > 0 {
			p("unknown keys", fmt.Sprintf("%d (reported as unmatched on apply)", len(l.Unknown)))
		}
	}
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.2f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func humanCount(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%d (%.2f B)", n, float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%d (%.2f M)", n, float64(n)/1e6)
	}
	return fmt.Sprint(n)
}
