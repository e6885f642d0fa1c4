package registry

import (
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
