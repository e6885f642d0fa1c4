package checkpoint

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// tiny is a small Flux-dev-shaped model: every width as FLUX.1 relates
// them, hidden 64 (2 heads of 32).
func tiny() layout.FluxConfig {
	return layout.FluxConfig{Hidden: 64, HeadDim: 32, MLP: 256, InChannels: 64, ContextDim: 64, VecDim: 32, TimeDim: 32,
		DoubleBlocks: 2, SingleBlocks: 1, Guidance: true}
}

// folder writes c's tensors (zeros, F32, diffusers names) as a model
// folder with the given config.json.
func folder(t *testing.T, c layout.FluxConfig, cfg map[string]any) string {
	t.Helper()
	specs, err := c.Tensors(layout.FluxDiffusers)
	if err != nil {
		t.Fatal(err)
	}
	var ts []safetensors.WriteTensor
	for _, s := range specs {
		shape := make([]int64, len(s.Shape))
		for i, d := range s.Shape {
			shape[i] = int64(d)
		}
		ts = append(ts, safetensors.WriteTensor{Name: s.Name, DType: safetensors.F32, Shape: shape, Data: make([]byte, 4*s.Elements())})
	}
	dir := t.TempDir()
	if err := safetensors.WriteSharded(dir, "diffusion_pytorch_model", nil, ts, 64<<10, nil); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func fluxCfg() map[string]any {
	return map[string]any{"_class_name": "FluxTransformer2DModel", "in_channels": 64, "num_layers": 2, "num_single_layers": 1,
		"attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32,
		"guidance_embeds": true, "out_channels": nil}
}

func describe(t *testing.T, dir string) (*Description, error) {
	t.Helper()
	s, err := safetensors.OpenSet(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	return Describe(s, nil)
}

func TestDescribeFolder(t *testing.T) {
	d, err := describe(t, folder(t, tiny(), fluxCfg()))
	if err != nil {
		t.Fatal(err)
	}
	if d.Container != safetensors.ContainerModelFolder || d.Shards < 2 || d.Class != "FluxTransformer2DModel" ||
		d.Flux == nil || *d.Flux != tiny() || !strings.HasPrefix(d.Variant, "flux.1-dev") {
		t.Errorf("%+v (flux %+v)", d, d.Flux)
	}
}

// A config.json that disagrees with the weights is an error naming the
// field, its value and what the weights have.
func TestDescribeConfigDisagrees(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(map[string]any)
		want string
	}{
		{"num_layers", func(c map[string]any) { c["num_layers"] = 19 }, "num_layers = 19 but the weights have 2 double blocks (transformer_blocks.N)"},
		{"num_single_layers", func(c map[string]any) { c["num_single_layers"] = 38 }, "num_single_layers = 38 but the weights have 1 single blocks"},
		{"in_channels", func(c map[string]any) { c["in_channels"] = 384 }, "in_channels = 384 but the weights have 64 input channels"},
		{"joint_attention_dim", func(c map[string]any) { c["joint_attention_dim"] = 4096 }, "joint_attention_dim = 4096 but the weights have 64"},
		{"heads", func(c map[string]any) { c["num_attention_heads"] = 24 }, "num_attention_heads × attention_head_dim = 24 × 32 = 768 but the weights' hidden width is 64"},
		{"head_dim", func(c map[string]any) { c["attention_head_dim"], c["num_attention_heads"] = 16, 4 }, "attention_head_dim = 16 but the QK-norm scales are 32 wide"},
		{"guidance", func(c map[string]any) { c["guidance_embeds"] = false }, "guidance_embeds = false but guidance_in/guidance_embedder is present"},
		{"chroma class", func(c map[string]any) { c["_class_name"] = "ChromaTransformer2DModel" }, "_class_name = ChromaTransformer2DModel but the weights have modulation layers"},
		{"quantized", func(c map[string]any) {
			c["quantization_config"] = map[string]any{"quant_method": "bitsandbytes", "load_in_4bit": true}
		}, "load_in_4bit = true but no weight carries a bitsandbytes 4-bit quant state"},
		{"gguf", func(c map[string]any) { c["quantization_config"] = map[string]any{"quant_method": "gguf"} }, `quant_method = "gguf"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := fluxCfg()
			tc.edit(cfg)
			dir := folder(t, tiny(), cfg)
			_, err := describe(t, dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), filepath.Join(dir, "config.json")) {
				t.Errorf("err %v\nwant %q", err, tc.want)
			}
		})
	}
}
