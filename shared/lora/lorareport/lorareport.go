// Package lorareport owns the JSON/msgpack shapes that describe LoRA
// files and applies: a file's Summary, an apply's Report and what they
// embed. It depends on nothing but the standard library and shared/layout,
// so sdk/api (and any client) can use them on every GOOS without pulling
// shared/lora's parsers, safetensors mapping or kernels.
package lorareport

import (
	"fmt"
	"math"
	"time"

	"github.com/arenahost/arenahost/shared/layout"
)

// KeyFormat is the key convention a LoRA file uses.
type KeyFormat string

// Key formats detected by Parse.
const (
	FormatKohya      KeyFormat = "kohya"      // lora_unet_…, lora_te1_…, lora_down/lora_up/alpha
	FormatOneTrainer KeyFormat = "onetrainer" // lora_transformer_… (OneTrainer "mixture" Flux)
	FormatLyCORIS    KeyFormat = "lycoris"    // lycoris_… (SimpleTuner LyCORIS)
	FormatDiffusers  KeyFormat = "diffusers"  // transformer./unet./text_encoder. + lora_A/lora_B (PEFT, ai-toolkit, SimpleTuner)
	FormatComfyUI    KeyFormat = "comfyui"    // diffusion_model.… (ComfyUI-saved)
	FormatXLabs      KeyFormat = "xlabs"      // double_blocks.N.processor.qkv_lora1.down…
	FormatBare       KeyFormat = "bare"       // module paths without a prefix (BFL control LoRAs, DiffSynth)
	FormatMixed      KeyFormat = "mixed"
)

// NetType is a LyCORIS network type.
type NetType string

// Network types.
const (
	TypeLoRA NetType = "lora" // up@down (LoCon for convs)
	TypeLoHa NetType = "loha" // (w1a@w1b) ⊙ (w2a@w2b)
	TypeLoKr NetType = "lokr" // kron(w1, w2)
	TypeFull NetType = "full" // diff (and diff_b)
)

// Meta is the training metadata a file carries.
type Meta struct {
	BaseModel     string `json:"ss_base_model_version,omitempty"`
	Architecture  string `json:"modelspec_architecture,omitempty"`
	NetworkModule string `json:"ss_network_module,omitempty"`
}

// Unmatched is a module or key that maps onto no layer, with the reason.
type Unmatched struct {
	Key    string `json:"key" msgpack:"key"`
	Reason string `json:"reason" msgpack:"reason"`
}

// Summary is what `arenahost inspect LORA` reports about a file without a
// model: key format, network types, ranks, alphas, the module paths it
// targets, the layout those names belong to, and the base model it was
// trained for.
type Summary struct {
	File         string        `json:"file" msgpack:"file"`
	Format       KeyFormat     `json:"format" msgpack:"format"`
	Types        []NetType     `json:"types" msgpack:"types"`
	DoRA         bool          `json:"dora" msgpack:"dora"`
	Modules      int           `json:"modules" msgpack:"modules"`
	Ranks        []int         `json:"ranks" msgpack:"ranks"`
	Alphas       []float64     `json:"alphas" msgpack:"alphas"`
	Scales       []float64     `json:"scales" msgpack:"scales"`
	Layout       layout.Layout `json:"layout" msgpack:"layout"` // naming of the targets; unknown when several or none fit
	Targets      []string      `json:"targets" msgpack:"targets"`
	BaseModel    string        `json:"base_model,omitempty" msgpack:"base_model,omitempty"`
	Architecture string        `json:"architecture,omitempty" msgpack:"architecture,omitempty"`
	Unknown      []string      `json:"unknown,omitempty" msgpack:"unknown,omitempty"`
}

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
