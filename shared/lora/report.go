package lora

import (
	"fmt"
	"math"
	"path/filepath"
	"time"
)

// LoRAReport is what happened to one LoRA file.
type LoRAReport struct {
	File      string      `json:"file" msgpack:"file"`
	Format    KeyFormat   `json:"format" msgpack:"format"`
	Types     []NetType   `json:"types" msgpack:"types"`
	Meta      Meta        `json:"meta" msgpack:"meta"`
	Strength  float64     `json:"strength" msgpack:"strength"`
	Matched   int         `json:"matched" msgpack:"matched"`
	Unmatched []Unmatched `json:"unmatched" msgpack:"unmatched"`
	// Factored counts modules applied as exact low-rank factors; Dense lists
	// the keys applied as a per-layer dense delta (full diff, DoRA, or a
	// factorisation costlier than dense).
	Factored int      `json:"factored" msgpack:"factored"`
	Dense    []string `json:"dense,omitempty" msgpack:"dense,omitempty"`
}

// LayerReport is the per-layer outcome.
type LayerReport struct {
	Layer string `json:"layer" msgpack:"layer"`
	Rank  int    `json:"rank" msgpack:"rank"`   // Σr of its side factors
	Dense bool   `json:"dense" msgpack:"dense"` // carries a dense delta
	// Fused mode only.
	Retention float64 `json:"retention,omitempty" msgpack:"retention,omitempty"`
	RelError  float64 `json:"rel_error,omitempty" msgpack:"rel_error,omitempty"`
	Warning   string  `json:"warning,omitempty" msgpack:"warning,omitempty"`
	// DeltaNorm2 is ‖ΔW‖² of the layer as the fused pass summed it, the
	// weight of its retention in a total over several passes; not
	// serialised.
	DeltaNorm2 float64 `json:"-" msgpack:"-"`
}

// Report is the outcome of an apply, serialisable to JSON and msgpack.
type Report struct {
	Mode          string        `json:"mode" msgpack:"mode"` // "side" or "fuse"
	LoRAs         []LoRAReport  `json:"loras" msgpack:"loras"`
	LayersTouched int           `json:"layers_touched" msgpack:"layers_touched"`
	Layers        []LayerReport `json:"layers" msgpack:"layers"`
	// SideBytes is the storage of A_cat, B_cat, dense deltas and bias
	// deltas (side mode).
	SideBytes int64 `json:"side_bytes" msgpack:"side_bytes"`
	// PeakScratchBytes is the largest working buffer the fused pass held.
	PeakScratchBytes int64 `json:"peak_scratch_bytes" msgpack:"peak_scratch_bytes"`
	// Retention and RelError over all fused layers: ⟨ΔW_eff, ΔW⟩/‖ΔW‖² and
	// ‖ΔW_eff − ΔW‖/‖ΔW‖.
	Retention float64       `json:"retention,omitempty" msgpack:"retention,omitempty"`
	RelError  float64       `json:"rel_error,omitempty" msgpack:"rel_error,omitempty"`
	Warnings  []string      `json:"warnings,omitempty" msgpack:"warnings,omitempty"`
	Elapsed   time.Duration `json:"elapsed_ns" msgpack:"elapsed_ns"`
	// Phases says where a fused apply's time went, step by step, as the
	// host and the plugin measured it (see docs/api.md).
	Phases []Phase `json:"phases,omitempty" msgpack:"phases,omitempty"`
}

// Phase is one step of an apply and the wall time it took.
type Phase struct {
	Name    string        `json:"name" msgpack:"name"`
	Elapsed time.Duration `json:"elapsed_ns" msgpack:"elapsed_ns"`
}

// AddPhase appends a step's wall time.
func (r *Report) AddPhase(name string, d time.Duration) {
	r.Phases = append(r.Phases, Phase{Name: name, Elapsed: d})
}

// DefaultWarnRetention is the retention below which a fused layer gets a
// warning when FuseOptions.WarnRetention is 0.
const DefaultWarnRetention = 0.5

// SetLayerFit fills layer li's Retention and RelError from its fused sums,
// dot = ⟨ΔW_eff, ΔW⟩, norm = ‖ΔW‖² and diff = ‖ΔW_eff − ΔW‖² (nothing when
// norm is 0), and below warn its Warning, which it also appends to
// r.Warnings under name. Fuse and the device fused pass both report
// through it.
func (r *Report) SetLayerFit(li int, name string, dot, norm, diff, warn float64) {
	if norm <= 0 {
		return
	}
	lr := &r.Layers[li]
	lr.Retention, lr.RelError, lr.DeltaNorm2 = dot/norm, math.Sqrt(diff/norm), norm
	if lr.Retention < warn {
		lr.Warning = fmt.Sprintf("retention %.3f below %.2f: re-quantization erased most of the LoRA here; use side mode", lr.Retention, warn)
		r.Warnings = append(r.Warnings, name+": "+lr.Warning)
	}
}

// SetFit sets the pass's Retention and RelError from the sums over all
// fused layers (as SetLayerFit's).
func (r *Report) SetFit(dot, norm, diff float64) {
	if norm > 0 {
		r.Retention, r.RelError = dot/norm, math.Sqrt(diff/norm)
	}
}

func newReport(maps []*Mapping, strengths []float64, mode string) *Report {
	r := &Report{Mode: mode}
	for i, m := range maps {
		types := map[NetType]bool{}
		var ts []NetType
		for _, t := range m.File.Modules {
			if !types[t.Type] {
				types[t.Type] = true
				ts = append(ts, t.Type)
			}
		}
		r.LoRAs = append(r.LoRAs, LoRAReport{
			File: filepath.Base(m.File.Path), Format: m.File.Format, Types: ts, Meta: m.File.Meta,
			Strength: strengths[i], Matched: len(m.Targets), Unmatched: m.Unmatched,
		})
	}
	return r
}
