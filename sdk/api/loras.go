package api

import (
	"time"

	"github.com/arenahost/arenahost/shared/lora/lorareport"
)

// LoRAFile is one file of GET /v1/loras.
type LoRAFile struct {
	// Name is the path relative to the LoRA directory without ".safetensors";
	// it is what apply requests and <lora:NAME:W> tags use.
	Name     string    `json:"name"`
	Path     string    `json:"path"` // relative to the LoRA directory
	Bytes    int64     `json:"bytes"`
	Modified time.Time `json:"modified"`
	// Kind is what the file holds: "lora" or "model" (the inspect kinds).
	Kind     string              `json:"kind,omitempty"`
	LoRA     *lorareport.Summary `json:"lora,omitempty"`
	Metadata map[string]string   `json:"metadata,omitempty"`
	// Error says why the file could not be inspected; it is still listed.
	Error string `json:"error,omitempty"`
}

// Kinds of LoRAFile.Kind.
const (
	FileKindModel = "model"
	FileKindLoRA  = "lora"
)

// ApplyLoRA is one LoRA of POST /v1/loras/apply: a name (or path relative
// to the LoRA directory, with or without ".safetensors") and its strength
// (1 when omitted).
type ApplyLoRA struct {
	Name     string   `json:"name"`
	Strength *float64 `json:"strength,omitempty"`
}

// ApplyRequest is the body of POST /v1/loras/apply. An empty set removes
// every LoRA.
type ApplyRequest struct {
	Model  string      `json:"model,omitempty"`
	LoRAs  []ApplyLoRA `json:"loras"`
	Mode   string      `json:"mode,omitempty"` // "side" (default, exact) or "fuse"
	Strict bool        `json:"strict,omitempty"`
	// FactorDType is how side mode stores the factors: "f32" or "bf16"
	// (omitted: the host's --lora-factor-dtype, f32 by default). bf16
	// halves their memory and upload; a pipeline that computes in
	// bfloat16 gets the same bits from either.
	FactorDType string `json:"factor_dtype,omitempty"`
}

// LoRA modes (ApplyRequest.Mode, LoRAState.Mode): the LoRA plugin's own
// (shared/lora/lorawire).
const (
	ModeSide = "side"
	ModeFuse = "fuse"
)

// AppliedLoRA is one LoRA of an applied set.
type AppliedLoRA struct {
	// Name is what the request called it (a name in the LoRA directory);
	// Path the confined file path the plugin reads.
	Name     string  `json:"name,omitempty"`
	Path     string  `json:"path"`
	Strength float64 `json:"strength"`
}

// LoRAState is what a model holds now: the body of GET /v1/loras/state.
type LoRAState struct {
	Model string        `json:"model"`
	Mode  string        `json:"mode,omitempty"` // "" when no LoRA is applied
	LoRAs []AppliedLoRA `json:"loras"`
	// Strict is the strict flag of the applied set.
	Strict bool `json:"strict,omitempty"`
	// FactorDType is the side factors' storage dtype ("f32" or "bf16";
	// empty in fuse mode).
	FactorDType string `json:"factor_dtype,omitempty"`
	// BindingGeneration changes whenever the bound side factors change.
	BindingGeneration uint64 `json:"binding_generation,omitempty"`
	// Fused lists the weights fused (fuse mode).
	Fused []string `json:"fused,omitempty"`
	// JournalBytes is the arena the fuse journal holds (original bytes
	// copied because the model has no source file, or its file differed).
	JournalBytes uint64 `json:"journal_bytes,omitempty"`
	// JournalFileBytes is what the fuse journal references in the model's
	// safetensors file instead of copying (checked by CRC-32C on restore).
	JournalFileBytes uint64 `json:"journal_file_bytes,omitempty"`
	// JournalMemoryBytes is what of JournalFileBytes the journal also
	// keeps in host memory, so that a restore reads no file (not arena).
	JournalMemoryBytes uint64             `json:"journal_memory_bytes,omitempty"`
	Report             *lorareport.Report `json:"report,omitempty"`
}

// LoRAResult is the outcome of an apply or remove: the body of
// POST /v1/loras/apply and DELETE /v1/loras.
type LoRAResult struct {
	LoRAState
	// NoOp says the request matched the current state and nothing ran.
	NoOp bool `json:"noop"`
	// Path says how it ran: "apply", "set_strengths", "remove" or "noop".
	Path    string        `json:"path"`
	Elapsed time.Duration `json:"elapsed_ns"`
}
