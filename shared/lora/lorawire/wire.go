// Package lorawire owns the contract between the host and the lora-nf4
// plugin: the msgpack arguments and results of its methods and the names of
// the tensors that travel with the calls. Both sides import it (the host
// imports no plugin code, and plugins no host code), so they cannot drift.
package lorawire

import (
	"fmt"

	"github.com/arenahost/arenahost/shared/lora"
)

// PluginName is the plugin the host's LoRA coordinator calls by default.
const PluginName = "lora-nf4"

// Modes of apply.
const (
	ModeSide = "side"
	ModeFuse = "fuse"
)

// Names of the tensors that travel with calls. W is a weight key
// ("double_blocks.0.img_attn.qkv.weight").
//
//   - apply (fuse): each weight of the plan, read-write, under its own
//     name, holding its original (unfused) bytes. The host keeps the
//     originals (its journal: a reference into the model's file or an
//     arena copy) and does every restore itself: before the call it puts
//     back weights fused earlier, including those the new set no longer
//     touches (which it does not pass); when the call fails (an error, a
//     cancelled call, a plugin killed mid-pass) it puts back every weight
//     it passed. The plugin journals nothing, holds no copy of the
//     originals, and stops writing when it returns an error. A cancelled
//     call returns on the host's side before the pass has noticed, so the
//     host calls fence first and rolls back once it returns: no pass is
//     writing the model's weights any more.
//   - apply (side) returns FactorA(W) and FactorB(W) for every bound layer.
//   - set_strengths: the bound factors, read-write, as FactorA(W), FactorB(W).

// FactorA names the bound A_cat of weight w.
func FactorA(w string) string { return "factors/" + w + "/A" }

// FactorB names the bound B_cat of weight w.
func FactorB(w string) string { return "factors/" + w + "/B" }

// LoRASpec is one LoRA of a set: a file path the host confined to its LoRA
// directory, and its strength.
type LoRASpec struct {
	Path     string  `msgpack:"path"`
	Strength float64 `msgpack:"strength"`
}

// InspectArgs are the arguments of inspect.
type InspectArgs struct {
	Paths []string `msgpack:"paths"`
	// Model, when set, also maps each file on that model and lists the
	// layers it targets and the keys it leaves unmatched.
	Model string `msgpack:"model"`
}

// ModuleInfo is one module of an inspected file.
type ModuleInfo struct {
	Key   string       `msgpack:"key"`
	Type  lora.NetType `msgpack:"type"`
	Rank  int          `msgpack:"rank"`
	Alpha float64      `msgpack:"alpha"`
	Scale float64      `msgpack:"scale"`
	Out   int          `msgpack:"out"`
	In    int          `msgpack:"in"`
}

// FileInfo is one inspected LoRA file.
type FileInfo struct {
	Path      string           `msgpack:"path"`
	Format    lora.KeyFormat   `msgpack:"format"`
	Types     []lora.NetType   `msgpack:"types"`
	Meta      lora.Meta        `msgpack:"meta"`
	Modules   []ModuleInfo     `msgpack:"modules"`
	Unknown   []string         `msgpack:"unknown"`
	Targets   []string         `msgpack:"targets,omitempty"` // weight keys, with Model
	Unmatched []lora.Unmatched `msgpack:"unmatched,omitempty"`
}

// InspectResult is the result of inspect.
type InspectResult struct {
	Files []FileInfo `msgpack:"files"`
}

// ApplyArgs are the arguments of plan and apply.
type ApplyArgs struct {
	Model  string     `msgpack:"model"`
	LoRAs  []LoRASpec `msgpack:"loras"`
	Mode   string     `msgpack:"mode"`
	Strict bool       `msgpack:"strict"`
	// TileElems bounds the fused pass's tile (0: shared/lora's default).
	TileElems int `msgpack:"tile_elems"`
	// FactorDType is the side factors' storage dtype: FactorF32 ("", the
	// default) or FactorBF16, each value rounded once to nearest even from
	// the float32 factor (scale and strength folded in). A forward that
	// computes in bfloat16 rounds float32 factors the same way, so it gets
	// the same bits from either, from half the memory with BF16.
	FactorDType string `msgpack:"factor_dtype,omitempty"`
}

// Side-factor storage dtypes (ApplyArgs.FactorDType, Factor.DType), as
// the HTTP API spells them.
const (
	FactorF32  = "f32"
	FactorBF16 = "bf16"
)

// CheckFactorDType returns the canonical dtype ("" is FactorF32) or an
// error naming the value.
func CheckFactorDType(dt string) (string, error) {
	switch dt {
	case "", FactorF32:
		return FactorF32, nil
	case FactorBF16:
		return FactorBF16, nil
	}
	return "", fmt.Errorf("factor_dtype %q: want %q or %q", dt, FactorF32, FactorBF16)
}

// PlanResult is the result of plan: the weights an apply of that set
// writes (fuse) or binds (side), so the host can journal them first and
// pass exactly those to apply.
type PlanResult struct {
	Weights []string     `msgpack:"weights"`
	Report  *lora.Report `msgpack:"report"`
}

// Factor is one layer's bound side factors: A [Rank × In] and B [Out ×
// Rank], of DType (FactorF32 when empty, or FactorBF16), returned as the
// tensors named A and B. Rank counts the dense
// columns too: a dense delta D travels as extra rows D of A with identity
// columns of B, so y += (x·Aᵀ)·Bᵀ stays the whole update.
type Factor struct {
	Weight string `msgpack:"weight"`
	A      string `msgpack:"a"`
	B      string `msgpack:"b"`
	Rank   int    `msgpack:"rank"`
	Out    int    `msgpack:"out"`
	In     int    `msgpack:"in"`
	DType  string `msgpack:"dtype,omitempty"`
}

// ApplyResult is the result of apply.
type ApplyResult struct {
	Report  *lora.Report `msgpack:"report"`
	Factors []Factor     `msgpack:"factors,omitempty"` // side
	Fused   []string     `msgpack:"fused,omitempty"`   // fuse: weights now fused
}

// SetStrengthsArgs are the arguments of set_strengths: the model and one
// strength per LoRA of the set last applied in side mode.
type SetStrengthsArgs struct {
	Model     string    `msgpack:"model"`
	Strengths []float64 `msgpack:"strengths"`
}

// SetStrengthsResult says which columns were rewritten.
type SetStrengthsResult struct {
	Touched []lora.Touched `msgpack:"touched"`
	Report  *lora.Report   `msgpack:"report"`
}

// FenceArgs are the arguments of fence: it returns once no fused pass on
// the model is running in the plugin.
type FenceArgs struct {
	Model string `msgpack:"model"`
}

// FenceResult is the result of fence.
type FenceResult struct{}

// PrepareArgs are the arguments of prepare: open, ahead of an apply, the
// device memory the model's 4-bit weights lie in (the host calls it after
// loading a model into a device arena).
type PrepareArgs struct {
	Model string `msgpack:"model"`
}

// PrepareResult says how many device slabs the plugin holds open.
type PrepareResult struct {
	Slabs int `msgpack:"slabs"`
}

// RemoveArgs are the arguments of remove.
type RemoveArgs struct {
	Model string `msgpack:"model"`
}

// RemoveResult is the result of remove.
type RemoveResult struct {
	Dropped bool `msgpack:"dropped"` // a side plan was held and is gone
}
