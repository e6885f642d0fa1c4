package layout

import "strings"

// Component is one model a checkpoint bundles: Forge and ComfyUI single
// files carry the diffusion model (model.diffusion_model.*) with its text
// encoders and VAE under their own prefixes.
type Component struct {
	Kind  string // "diffusion", "te1", "te2", "t5", "vae"
	Label string // for people: "text encoder 1 (CLIP-L)"
}

// bundled lists each component's key prefixes (single files: Forge,
// ComfyUI, A1111/sgm; and the diffusers component names LoRA files use).
var bundled = []struct {
	c        Component
	prefixes []string
}{
	{Component{"diffusion", "diffusion model"}, []string{"model.diffusion_model."}},
	{Component{"te1", "text encoder 1 (CLIP-L)"}, []string{"text_encoders.clip_l.", "cond_stage_model.", "conditioner.embedders.0.", "text_encoder."}},
	{Component{"te2", "text encoder 2 (OpenCLIP-G / CLIP-G)"}, []string{"conditioner.embedders.1.", "text_encoders.clip_g.", "text_encoder_2."}},
	{Component{"t5", "T5-XXL text encoder"}, []string{"text_encoders.t5xxl.", "text_encoder_3."}},
	{Component{"vae", "VAE"}, []string{"first_stage_model.", "vae."}},
}

// ComponentOf returns the bundled component a tensor name belongs to and
// the prefix that says so; ok is false for names under no component
// prefix (a bare transformer's own keys).
func ComponentOf(name string) (c Component, prefix string, ok bool) {
	for _, b := range bundled {
		for _, p := range b.prefixes {
			if strings.HasPrefix(name, p) {
				return b.c, p, true
			}
		}
	}
	return Component{}, "", false
}

// ComponentLabel returns the label of a component kind ("te1" → "text
// encoder 1 (CLIP-L)"), or the kind itself.
func ComponentLabel(kind string) string {
	for _, b := range bundled {
		if b.c.Kind == kind {
			return b.c.Label
		}
	}
	return kind
}
