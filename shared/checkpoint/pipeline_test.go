package checkpoint

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/safetensors"
)

// pipelineFolder writes a diffusers Flux pipeline folder: the tiny
// transformer (sharded, with its config), a CLIP text_encoder/ in F16, a
// T5 text_encoder_2/ in two shards with their index, and a vae/ in
// diffusers names (its down_blocks must not read as a UNet).
func pipelineFolder(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	if err := os.Rename(folder(t, tiny(), fluxCfg()), filepath.Join(root, "transformer")); err != nil {
		t.Fatal(err)
	}
	seq := func(n int, base byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = base + byte(i)
		}
		return b
	}
	write := func(sub, base string, max int64, ts ...safetensors.WriteTensor) {
		dir := filepath.Join(root, sub)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := safetensors.WriteSharded(dir, base, nil, ts, max, nil); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("text_encoder", "model", 1<<20,
		safetensors.WriteTensor{Name: "embeddings.token_embedding.weight", DType: safetensors.F16, Shape: []int64{16, 8}, Data: seq(256, 1)},
		safetensors.WriteTensor{Name: "encoder.layers.0.self_attn.q_proj.weight", DType: safetensors.F16, Shape: []int64{8, 8}, Data: seq(128, 7)})
	write("text_encoder_2", "model", 300,
		safetensors.WriteTensor{Name: "shared.weight", DType: safetensors.F32, Shape: []int64{16, 4}, Data: seq(256, 3)},
		safetensors.WriteTensor{Name: "encoder.block.0.layer.0.SelfAttention.q.weight", DType: safetensors.F32, Shape: []int64{8, 8}, Data: seq(256, 9)})
	write("vae", "diffusion_pytorch_model", 1<<20,
		safetensors.WriteTensor{Name: "encoder.down_blocks.0.resnets.0.conv1.weight", DType: safetensors.F32, Shape: []int64{4, 3, 1, 1}, Data: seq(48, 5)},
		safetensors.WriteTensor{Name: "decoder.conv_in.weight", DType: safetensors.F32, Shape: []int64{4, 4, 1, 1}, Data: seq(64, 2)})
	idx := `{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
		"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
		"vae": ["diffusers", "AutoencoderKL"], "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}`
	if err := os.WriteFile(filepath.Join(root, "model_index.json"), []byte(idx), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestOpenModelCarriesPipelineComponents(t *testing.T) {
	root := pipelineFolder(t)
	s, notes, err := OpenModel(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if len(notes) != 0 {
		t.Errorf("notes %q", notes)
	}
	if len(s.Components) != 3 || s.Components[1].Folder != "text_encoder_2" || len(s.Components[1].Files) != 2 || s.Components[1].Index == "" {
		t.Fatalf("components %+v", s.Components)
	}
	// A component's tensor under its prefix reads its own file's bytes.
	b, err := s.Data("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")
	if err != nil || len(b) != 256 || b[0] != 9 || b[255] != byte(9+255-256) {
		t.Fatalf("T5 q: %v %v", len(b), err)
	}
	if err := s.Evict("vae.decoder.conv_in.weight"); err != nil {
		t.Error(err)
	}
	d, err := Describe(s, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.LayoutError != "" || d.Layout.Layout.String() != "flux-diffusers" || d.Shards != s.ModelFiles() || d.Flux == nil {
		t.Errorf("layout %v (%s), shards %d of %d files, flux %v", d.Layout, d.LayoutError, d.Shards, len(s.Files), d.Flux)
	}
	want := map[string]struct {
		pre, sub string
		n        int
	}{"te1": {"text_encoders.clip_l.", "text_encoder", 2}, "t5": {"text_encoders.t5xxl.", "text_encoder_2", 2}, "vae": {"vae.", "vae", 2}}
	if len(d.Components) != len(want) {
		t.Fatalf("components %+v", d.Components)
	}
	for _, c := range d.Components {
		w := want[c.Kind]
		if c.Prefix != w.pre || c.Source != filepath.Join(root, w.sub) || c.Tensors != w.n {
			t.Errorf("component %+v, want %+v", c, w)
		}
	}
	// OpenSet alone (merge --model) sees only the transformer.
	bare, err := safetensors.OpenSet(root)
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	if len(bare.Tensors) != len(s.Tensors)-6 || bare.Components != nil {
		t.Errorf("OpenSet: %d tensors, components %v", len(bare.Tensors), bare.Components)
	}
}

func TestOpenModelPipelineComponentFaults(t *testing.T) {
	cases := []struct {
		name    string
		break_  func(t *testing.T, root string)
		errWant []string // "" = no error
		note    string
	}{
		{"pickled encoder is left out with a note", func(t *testing.T, root string) {
			dir := filepath.Join(root, "text_encoder")
			os.Remove(filepath.Join(dir, "model.safetensors"))
			os.WriteFile(filepath.Join(dir, "pytorch_model.bin"), []byte("pickle"), 0o644)
		}, nil, "text_encoder/: no safetensors weights"},
		{"missing shard names the shard", func(t *testing.T, root string) {
			m, _ := filepath.Glob(filepath.Join(root, "text_encoder_2", "model-00002-of-*.safetensors"))
			if len(m) != 1 {
				t.Fatalf("shards %v", m)
			}
			os.Remove(m[0])
		}, []string{"component text_encoder_2/", filepath.Base("model-00002-of-00002.safetensors")}, ""},
		{"bad model_index.json", func(t *testing.T, root string) {
			os.WriteFile(filepath.Join(root, "model_index.json"), []byte("{nope"), 0o644)
		}, []string{"model_index.json"}, ""},
		{"folder named but absent", func(t *testing.T, root string) {
			os.RemoveAll(filepath.Join(root, "vae"))
		}, nil, "model_index.json names vae but there is no vae/ folder"},
		{"class not carried", func(t *testing.T, root string) {
			b, _ := os.ReadFile(filepath.Join(root, "model_index.json"))
			os.WriteFile(filepath.Join(root, "model_index.json"), bytes.Replace(b, []byte(`"AutoencoderKL"`), []byte(`"AutoencoderTiny"`), 1), 0o644)
		}, nil, `class "AutoencoderTiny" is not carried`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			root := pipelineFolder(t)
			tc.break_(t, root)
			s, notes, err := OpenModel(root)
			if tc.errWant != nil {
				if err == nil {
					s.Close()
					t.Fatal("opened")
				}
				for _, w := range tc.errWant {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if len(notes) != 1 || !strings.Contains(notes[0], tc.note) {
				t.Errorf("notes %q, want %q", notes, tc.note)
			}
			if len(s.Components) != 2 {
				t.Errorf("components %+v", s.Components)
			}
		})
	}
}
