package cli

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// A Forge/ComfyUI-style bundled single file: the NF4 diffusion model under
// model.diffusion_model. beside CLIP-L (F16), T5-XXL (F8_E4M3) and a VAE
// (BF16). inspect lists each component; a merge applies the diffusion
// model's LoRA keys and reports the text-encoder keys unmatched with the
// reason: an encoder bundled but not in 4-bit, or not bundled at all.
func TestBundledSingleFile(t *testing.T) {
	dir := t.TempDir()
	bare := filepath.Join(dir, "bare.safetensors")
	if err := samples.WriteModel(bare, samples.ModelOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(bare)
	if err != nil {
		t.Fatal(err)
	}
	var ts []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		b, _ := f.Data(ti.Name)
		ts = append(ts, safetensors.WriteTensor{Name: "model.diffusion_model." + ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
	}
	defer f.Close() // ts holds slices of its mapping
	ts = append(ts,
		safetensors.WriteTensor{Name: "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", DType: safetensors.F16, Shape: []int64{64, 64}, Data: make([]byte, 2*64*64)},
		safetensors.WriteTensor{Name: "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", DType: safetensors.DType("F8_E4M3"), Shape: []int64{64, 64}, Data: make([]byte, 64*64)},
		safetensors.WriteTensor{Name: "vae.decoder.conv_in.weight", DType: safetensors.BF16, Shape: []int64{8, 4, 3, 3}, Data: make([]byte, 2*8*4*9)})
	bundle := filepath.Join(dir, "flux-bundle.safetensors")
	if err := safetensors.WriteFile(bundle, nil, ts); err != nil {
		t.Fatal(err)
	}
	r, err := inspect.File(bundle)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]string{}
	for _, c := range r.Model.Components {
		kinds[c.Kind] = c.Prefix
	}
	if len(r.Model.Components) != 4 || kinds["diffusion"] != "model.diffusion_model." || kinds["te1"] != "text_encoders.clip_l." ||
		kinds["t5"] != "text_encoders.t5xxl." || kinds["vae"] != "vae." || r.Model.Prefix != "model.diffusion_model." || !strings.HasPrefix(r.Model.Variant, "flux.1-dev") {
		t.Errorf("components %+v, prefix %q, variant %q", r.Model.Components, r.Model.Prefix, r.Model.Variant)
	}
	var text strings.Builder
	if err := r.WriteText(&text); err != nil || !strings.Contains(text.String(), `T5-XXL text encoder under "text_encoders.t5xxl.": 1 tensors (1 F8_E4M3)`) {
		t.Errorf("inspect text (%v):\n%s", err, text.String())
	}

	// The sample kohya LoRA plus text-encoder modules for CLIP-L (lora_te1_),
	// T5 (lora_te3_) and a second CLIP (lora_te2_) the file does not have.
	lf := filepath.Join(dir, "with-te.safetensors")
	if err := samples.WriteKohyaLoRA(filepath.Join(dir, "k.safetensors"), samples.LoRAOptions{Seed: 4, DType: safetensors.F32}); err != nil {
		t.Fatal(err)
	}
	k, err := safetensors.Open(filepath.Join(dir, "k.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	ts = nil
	for _, ti := range k.Tensors {
		b, _ := k.Data(ti.Name)
		ts = append(ts, safetensors.WriteTensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
	}
	defer k.Close()
	for _, mod := range []string{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"} {
		ts = append(ts,
			safetensors.WriteTensor{Name: mod + ".lora_down.weight", DType: safetensors.F32, Shape: []int64{2, 64}, Data: f32le(make([]float32, 128))},
			safetensors.WriteTensor{Name: mod + ".lora_up.weight", DType: safetensors.F32, Shape: []int64{64, 2}, Data: f32le(make([]float32, 128))})
	}
	if err := safetensors.WriteFile(lf, nil, ts); err != nil {
		t.Fatal(err)
	}
	rep, err := Merge(context.Background(), MergeOptions{Model: bundle, Out: filepath.Join(dir, "merged.safetensors"), As: "nf4",
		LoRAs: []MergeLoRA{{Path: lf, Strength: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]string{}
	for _, u := range rep.Report.LoRAs[0].Unmatched {
		reasons[u.Key] = u.Reason
	}
	for key, want := range map[string]string{
		"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "bundles text encoder 1 (CLIP-L) (e.g. text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight) but not in bitsandbytes 4-bit",
		"lora_te3_encoder_block_0_layer_0_SelfAttention_q":      "bundles T5-XXL text encoder (e.g. text_encoders.t5xxl.",
		"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "the checkpoint bundles no text encoder 2",
	} {
		if !strings.Contains(reasons[key], want) {
			t.Errorf("%s: reason %q, want %q", key, reasons[key], want)
		}
	}
	if len(reasons) != 3 || len(rep.Report.Layers) == 0 {
		t.Errorf("unmatched %v; %d layers merged", reasons, len(rep.Report.Layers))
	}
}

// A diffusers pipeline folder: inspect lists its text encoders and VAE as
// components (with the folder each came from) beside the transformer, and
// says which component folder it left out and why.
func TestPipelineFolderComponents(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"transformer", "text_encoder", "text_encoder_2", "vae"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := samples.WriteModel(filepath.Join(root, "transformer", "diffusion_pytorch_model.safetensors"), samples.ModelOptions{Seed: 3}); err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteFile(filepath.Join(root, "text_encoder", "model.safetensors"), nil, []safetensors.WriteTensor{
		{Name: "text_model.encoder.layers.0.self_attn.q_proj.weight", DType: safetensors.F16, Shape: []int64{4, 4}, Data: make([]byte, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "text_encoder_2", "pytorch_model.bin"), []byte("pickle"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteFile(filepath.Join(root, "vae", "diffusion_pytorch_model.safetensors"), nil, []safetensors.WriteTensor{
		{Name: "decoder.conv_in.weight", DType: safetensors.BF16, Shape: []int64{2, 2}, Data: make([]byte, 8)}}); err != nil {
		t.Fatal(err)
	}
	idx := `{"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
		"text_encoder_2": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]}`
	if err := os.WriteFile(filepath.Join(root, "model_index.json"), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := inspect.File(root)
	if err != nil {
		t.Fatal(err)
	}
	if r.Model.Container != "pipeline-folder" || len(r.Model.Components) != 2 || r.Model.Components[0].Kind != "te1" || r.Model.Components[1].Kind != "vae" {
		t.Fatalf("container %s, components %+v", r.Model.Container, r.Model.Components)
	}
	var text strings.Builder
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`text encoder 1 (CLIP-L) under "text_encoders.clip_l." from ` + filepath.Join(root, "text_encoder") + `: 1 tensors (1 F16)`,
		`VAE under "vae." from ` + filepath.Join(root, "vae"),
		filepath.Join(root, "text_encoder_2") + "/: no safetensors weights",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("inspect text lacks %q:\n%s", want, text.String())
		}
	}
}
