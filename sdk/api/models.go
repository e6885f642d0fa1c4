package api

import "time"

// ModelInfo is one entry of GET /v1/models and the body of a successful
// POST /v1/models.
type ModelInfo struct {
	Name   string `json:"name"`
	Source string `json:"source"`
	Format string `json:"format"`
	Layout string `json:"layout"`
	// Variant is the Flux-family model recognised ("chroma", "flux.1-dev",
	// …), Container "file", "model-folder" or "pipeline-folder".
	Variant   string `json:"variant,omitempty"`
	Container string `json:"container,omitempty"`
	Tensors   int    `json:"tensors"`
	Weights   int    `json:"weights"`
	Params    int64  `json:"params"`
	Bytes     uint64 `json:"bytes"`
	// Components are the models held beside the diffusion model: the
	// text encoders and VAE a single file bundles, or a pipeline folder's
	// text_encoder*/ and vae/ (Source names the folder), each in the arena
	// under its name prefix.
	Components []ModelComponent `json:"components,omitempty"`
	// Notes say what of a pipeline folder is not in the arena and why
	// (a component without safetensors weights).
	Notes []string `json:"notes,omitempty"`
}

// ModelComponent is one model a loaded checkpoint holds beside (or as) its
// diffusion model.
type ModelComponent struct {
	Kind    string `json:"kind"` // diffusion, te1, te2, t5, vae
	Label   string `json:"label"`
	Prefix  string `json:"prefix"`
	Source  string `json:"source,omitempty"`
	Tensors int    `json:"tensors"`
	Bytes   int64  `json:"bytes"`
	Weights int    `json:"weights_4bit"`
}

// LoadModelRequest is the body of POST /v1/models.
type LoadModelRequest struct {
	// Path is relative to the models directory (or absolute inside it).
	Path string `json:"path"`
	// Name registers the model; the file name without extension when empty.
	Name string `json:"name,omitempty"`
}

// Unloaded is the body of DELETE /v1/models/{name}.
type Unloaded struct {
	Unloaded string `json:"unloaded"`
}

// ModelFile is one entry of GET /v1/models/files.
type ModelFile struct {
	// Path is relative to the models directory, with '/' separators: what
	// POST /v1/models takes.
	Path     string    `json:"path"`
	Name     string    `json:"name"` // the model name a load without one registers
	Bytes    int64     `json:"bytes"`
	Modified time.Time `json:"modified"`
	// Loaded names the loaded models whose source is this file.
	Loaded []string `json:"loaded,omitempty"`
}

// ModelDigest is the body of GET /v1/models/{name}/digest: SHA-256 of
// every stored tensor's bytes as the arena holds them now, and one digest
// over all of them. A UI or extension compares the digest taken before a
// LoRA apply with the one after removing it to check that the weights hold
// their original bytes again, and a digest of a model on the device with
// the same model loaded on the CPU.
type ModelDigest struct {
	Model string `json:"model"`
	// SHA256 hashes, in tensor-name order, each tensor's name, a NUL and its
	// own hex SHA-256, then a newline: it changes when any byte changes.
	SHA256  string `json:"sha256"`
	Tensors int    `json:"tensors"`
	Bytes   uint64 `json:"bytes"`
	// PerTensor lists each tensor's SHA-256 (with ?detail=1).
	PerTensor map[string]string `json:"per_tensor,omitempty"`
}
