package cli

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/inspect"
	"github.com/arenahost/arenahost/internal/teoracle"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// A Forge/ComfyUI-style bundled single file: the NF4 diffusion model under
// model.diffusion_model. beside CLIP-L (F16), T5-XXL (F8_E4M3) and a VAE
// (BF16). inspect lists each component; a merge applies the diffusion
// model's LoRA keys and the bundled encoders' keys, and reports a key of
// an encoder not bundled unmatched with the reason.
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
	// CLIP-L (F16) and T5 (F8_E4M3) are bundled: their keys merge into
	// them; the second CLIP is not there.
	if want := "the checkpoint bundles no text encoder 2"; len(reasons) != 1 || !strings.Contains(reasons["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], want) {
		t.Errorf("unmatched %v, want only lora_te2_… (%q)", reasons, want)
	}
	merged := map[string]bool{}
	for _, l := range rep.Report.Layers {
		merged[l.Layer] = true
	}
	for _, l := range []string{"text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"} {
		if !merged[l] {
			t.Errorf("%s not merged (layers %d)", l, len(rep.Report.Layers))
		}
	}
}

// merge writes a text-encoder LoRA into a bundled file's plain encoders
// (CLIP-L F16, T5 F8_E4M3), as nf4 and as bf16 output: each encoder tensor
// keeps its dtype and holds torch's (w.float() + delta).to(dtype) (≥ 99.9 %
// identical, the rest one step of the dtype away); the transformer's
// tensors are those the transformer's LoRA alone merges to.
func TestMergeBundledTextEncoders(t *testing.T) {
	dir := t.TempDir()
	bundle, teLoRA, kohya := filepath.Join(dir, samples.BundleFile), filepath.Join(dir, samples.BundleTELoRAFile), filepath.Join(dir, "k.safetensors")
	if err := samples.WriteBundle(bundle, 5); err != nil {
		t.Fatal(err)
	}
	if err := samples.WriteBundleTELoRA(teLoRA, 6); err != nil {
		t.Fatal(err)
	}
	if err := samples.WriteKohyaLoRA(kohya, samples.LoRAOptions{Seed: 4}); err != nil {
		t.Fatal(err)
	}
	in, err := safetensors.Open(bundle)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	oracle := teoracle.Run(t, bundle, teLoRA, 0.7, func(k string) []byte { b, _ := in.Data(k); return b })
	for _, as := range []string{"nf4", "bf16"} {
		alone, both := filepath.Join(dir, as+"-alone.safetensors"), filepath.Join(dir, as+"-both.safetensors")
		if _, err := Merge(context.Background(), MergeOptions{Model: bundle, Out: alone, As: as, LoRAs: []MergeLoRA{{Path: kohya, Strength: 1}}}); err != nil {
			t.Fatal(err)
		}
		rep, err := Merge(context.Background(), MergeOptions{Model: bundle, Out: both, As: as, Strict: true, LoRAs: []MergeLoRA{{Path: kohya, Strength: 1}, {Path: teLoRA, Strength: 0.7}}})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(rep.Report.LoRAs[1].Unmatched); n != 0 {
			t.Errorf("%s: %d text-encoder keys unmatched", as, n)
		}
		a, err := safetensors.Open(alone)
		if err != nil {
			t.Fatal(err)
		}
		b, err := safetensors.Open(both)
		if err != nil {
			t.Fatal(err)
		}
		same, total := 0, 0
		for _, ti := range b.Tensors {
			got, _ := b.Data(ti.Name)
			if w, ok := oracle[ti.Name]; ok {
				if it, _ := in.Lookup(ti.Name); ti.DType != it.DType {
					t.Errorf("%s: %s written as %s, stored %s", as, ti.Name, ti.DType, it.DType)
				}
				sm, n, err := teoracle.Compare(ti.Name, w, got)
				if err != nil {
					t.Errorf("%s: %v", as, err)
				}
				same, total = same+sm, total+n
				continue
			}
			if want, _ := a.Data(ti.Name); string(want) != string(got) {
				t.Errorf("%s: %s differs from the transformer's LoRA merged alone", as, ti.Name)
			}
		}
		if total != 27904 {
			t.Errorf("%s: %d encoder values compared", as, total)
		}
		teoracle.Enough(t, "merge --as "+as+": encoder weights", same, total)
		a.Close()
		b.Close()
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
