package registry

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/arenahost/arenahost/shared/safetensors"
)

// A bundled single file (NF4 diffusion model under model.diffusion_model.,
// CLIP-L in F16, T5 in F8_E4M3, a BF16 VAE) loads whole: every tensor in
// the arena, the layout and variant from the diffusion model's layers.
func TestLoadBundledSingleFile(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.safetensors")
	writeCheckpoint(t, base, checkpointSpec{rows: 192, cols: 64, weights: 2, blocksize: 64, seed: 5, prefix: "model.diffusion_model."})
	bundle := filepath.Join(dir, "bundle.safetensors")
	extra := []safetensors.WriteTensor{
		{Name: "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", DType: safetensors.F16, Shape: []int64{8, 8}, Data: make([]byte, 128)},
		{Name: "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", DType: safetensors.DType("F8_E4M3"), Shape: []int64{8, 8}, Data: make([]byte, 64)},
		{Name: "vae.decoder.conv_in.weight", DType: safetensors.BF16, Shape: []int64{4, 4}, Data: make([]byte, 32)},
	}
	f, err := safetensors.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	var all []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		b, _ := f.Data(ti.Name)
		all = append(all, safetensors.WriteTensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: append([]byte(nil), b...)})
	}
	f.Close()
	all = append(all, extra...)
	if err := safetensors.WriteFile(bundle, nil, all); err != nil {
		t.Fatal(err)
	}
	reg := New(newTestArena(t, 64<<20, 0), quiet())
	m, err := reg.Load(t.Context(), "bundle", bundle)
	if err != nil {
		t.Fatal(err)
	}
	if m.Layout != "flux-bfl" || m.LayoutPrefix != "model.diffusion_model." || m.Container != "file" || len(m.Tensors) != len(all) || len(m.Weights) != 2 {
		t.Errorf("layout %s prefix %q container %s, %d tensors of %d, %d weights", m.Layout, m.LayoutPrefix, m.Container, len(m.Tensors), len(all), len(m.Weights))
	}
	for _, e := range extra {
		if tn, ok := m.Tensor(e.Name); !ok || string(tn.DType) != string(e.DType) {
			t.Errorf("bundled tensor %s: %+v", e.Name, tn)
		}
	}
}

// A diffusers pipeline folder loads with its text encoders and VAE: each
// component's tensors in the arena under the prefix a bundled file uses,
// read from its own files, listed in Components with the folder; the
// transformer's layout and tensors are as without them.
func TestLoadPipelineFolderComponents(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"transformer", "text_encoder", "text_encoder_2", "vae"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeCheckpoint(t, filepath.Join(root, "transformer", "diffusion_pytorch_model.safetensors"), checkpointSpec{rows: 192, cols: 64, weights: 2, blocksize: 64, seed: 5})
	clip := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	te := func(sub string, ts ...safetensors.WriteTensor) {
		if err := safetensors.WriteFile(filepath.Join(root, sub, "model.safetensors"), nil, ts); err != nil {
			t.Fatal(err)
		}
	}
	te("text_encoder", safetensors.WriteTensor{Name: "encoder.layers.0.self_attn.q_proj.weight", DType: safetensors.F16, Shape: []int64{2, 2}, Data: clip})
	te("text_encoder_2", safetensors.WriteTensor{Name: "shared.weight", DType: safetensors.F32, Shape: []int64{2, 2}, Data: make([]byte, 16)})
	if err := safetensors.WriteFile(filepath.Join(root, "vae", "diffusion_pytorch_model.safetensors"), nil, []safetensors.WriteTensor{
		{Name: "encoder.down_blocks.0.resnets.0.conv1.weight", DType: safetensors.F32, Shape: []int64{1, 1, 1, 1}, Data: make([]byte, 4)}}); err != nil {
		t.Fatal(err)
	}
	idx := `{"transformer": ["diffusers", "FluxTransformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"],
		"text_encoder_2": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]}`
	if err := os.WriteFile(filepath.Join(root, "model_index.json"), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	reg := New(newTestArena(t, 64<<20, 0), quiet())
	m, err := reg.Load(t.Context(), "pipe", root)
	if err != nil {
		t.Fatal(err)
	}
	if m.Container != "pipeline-folder" || m.Layout != "flux-bfl" || len(m.Weights) != 2 || len(m.Components) != 3 || len(m.Notes) != 0 {
		t.Fatalf("container %s layout %s, %d weights, components %+v, notes %q", m.Container, m.Layout, len(m.Weights), m.Components, m.Notes)
	}
	for i, want := range []string{"text_encoder", "text_encoder_2", "vae"} {
		if c := m.Components[i]; c.Source != filepath.Join(root, want) || c.Tensors != 1 {
			t.Errorf("component %d: %+v, want from %s", i, c, want)
		}
	}
	name := "text_encoders.clip_l.transformer.encoder.layers.0.self_attn.q_proj.weight"
	tn, ok := m.Tensor(name)
	if !ok {
		t.Fatalf("no %s", name)
	}
	var scratch []byte
	got, err := reg.read(tn, &scratch)
	if err != nil || string(got) != string(clip) {
		t.Errorf("%s in the arena: %v %v", name, got, err)
	}
	// The journal's source reads reach a component's own file.
	ref, ok := m.SourceOf(name)
	if !ok || ref.File != filepath.Join(root, "text_encoder", "model.safetensors") {
		t.Fatalf("source of %s: %+v %v", name, ref, ok)
	}
	p := make([]byte, len(clip))
	if err := m.ReadSource(ref, 0, p); err != nil || string(p) != string(clip) {
		t.Errorf("ReadSource: %v %v", p, err)
	}
}
