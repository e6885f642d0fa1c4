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

// fixture is a diffusers model's config.json and tensor shapes, as
// testdata/make_fixtures.py wrote them from the real diffusers class.
type fixture struct {
	Config  map[string]any     `json:"config"`
	Tensors map[string][]int64 `json:"tensors"`
}

func loadFixture(t *testing.T, name string) fixture {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var f fixture
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return f
}

// write makes a sharded model folder of f's tensors (zeros, F16) with cfg
// as its config.json.
func (f fixture) write(t *testing.T, cfg map[string]any) string {
	t.Helper()
	var ts []safetensors.WriteTensor
	for name, shape := range f.Tensors {
		n := int64(1)
		for _, d := range shape {
			n *= d
		}
		ts = append(ts, safetensors.WriteTensor{Name: name, DType: safetensors.F16, Shape: shape, Data: make([]byte, 2*n)})
	}
	dir := t.TempDir()
	if err := safetensors.WriteSharded(dir, "diffusion_pytorch_model", nil, ts, 32<<10, nil); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// cloneCfg deep-copies a decoded config so that a case's edit stays its own.
func cloneCfg(t *testing.T, c map[string]any) map[string]any {
	t.Helper()
	b, _ := json.Marshal(c)
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// The config diffusers wrote for the weights is accepted as it is, and the
// folder is recognised as the model's layout.
func TestDescribeUNetAndSD3Folders(t *testing.T) {
	for _, tc := range []struct {
		fixture string
		layout  layout.Layout
	}{{"sdxl", layout.SDXL}, {"sd15", layout.SD15}, {"sd35", layout.SD3}} {
		t.Run(tc.fixture, func(t *testing.T) {
			f := loadFixture(t, tc.fixture)
			d, err := describe(t, f.write(t, f.Config))
			if err != nil {
				t.Fatal(err)
			}
			if d.Layout.Layout != tc.layout || d.Layout.Naming != layout.NamingDiffusers || d.Shards < 2 || d.Class != f.Config["_class_name"] || len(d.Warnings) != 0 {
				t.Errorf("%+v", d)
			}
		})
	}
}

// A config.json that disagrees with an SDXL UNet's or an SD3.5
// transformer's weights is an error naming the file, the field, its value
// and the tensor that says otherwise.
func TestDescribeUNetAndSD3ConfigDisagrees(t *testing.T) {
	for _, tc := range []struct {
		fixture, name string
		edit          func(map[string]any)
		want          string
	}{
		{"sdxl", "in_channels", func(c map[string]any) { c["in_channels"] = 9 }, "in_channels = 9 but conv_in.weight has 4 input channels"},
		{"sdxl", "out_channels", func(c map[string]any) { c["out_channels"] = 8 }, "out_channels = 8 but conv_out.weight has 4 output channels"},
		{"sdxl", "block_out_channels", func(c map[string]any) { c["block_out_channels"] = []int{320, 640, 1280} },
			"block_out_channels[0] = 320 but down_blocks.0.resnets.0.conv1.weight has 32 output channels"},
		{"sdxl", "levels", func(c map[string]any) { c["block_out_channels"] = []int{32, 32, 64, 64} },
			"block_out_channels has 4 levels but the weights have 3 (down_blocks.N)"},
		{"sdxl", "down_block_types", func(c map[string]any) {
			c["down_block_types"] = []string{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}
		}, "down_block_types[0] = CrossAttnDownBlock2D but the weights' down_blocks.0 has no down_blocks.0.attentions.N"},
		{"sdxl", "up_block_types", func(c map[string]any) {
			c["up_block_types"] = []string{"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}
		}, "up_block_types has 4 blocks but the weights have 3 (up_blocks.N)"},
		{"sdxl", "layers_per_block", func(c map[string]any) { c["layers_per_block"] = 3 }, "layers_per_block = 3 (level 0) but the weights have 2 down_blocks.0.resnets.N"},
		{"sdxl", "transformer_layers_per_block", func(c map[string]any) { c["transformer_layers_per_block"] = []int{1, 1, 10} },
			"transformer_layers_per_block[2] = 10 but the weights have 2 down_blocks.2.attentions.0.transformer_blocks.N"},
		{"sdxl", "cross_attention_dim", func(c map[string]any) { c["cross_attention_dim"] = 2048 },
			"cross_attention_dim = 2048 but down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight is 48 wide"},
		{"sdxl", "projection_class_embeddings_input_dim", func(c map[string]any) { c["projection_class_embeddings_input_dim"] = 2816 },
			"projection_class_embeddings_input_dim = 2816 but add_embedding.linear_1.weight is 88 wide"},
		{"sdxl", "addition_embed_type", func(c map[string]any) { c["addition_embed_type"] = nil },
			"addition_embed_type = null but the weights have add_embedding.linear_1"},
		{"sdxl", "use_linear_projection", func(c map[string]any) { c["use_linear_projection"] = false },
			"use_linear_projection = false but down_blocks.1.attentions.0.proj_in.weight has shape [32 32]"},
		{"sdxl", "class", func(c map[string]any) { c["_class_name"] = "SD3Transformer2DModel" },
			"_class_name = SD3Transformer2DModel but the weights are a sdxl model (want UNet2DConditionModel)"},
		{"sd15", "cross_attention_dim", func(c map[string]any) { c["cross_attention_dim"] = 768 },
			"cross_attention_dim = 768 but down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight is 40 wide"},
		{"sd15", "use_linear_projection", func(c map[string]any) { c["use_linear_projection"] = true },
			"use_linear_projection = true but down_blocks.0.attentions.0.proj_in.weight has shape [32 32 1 1]"},
		{"sd15", "down_block_types", func(c map[string]any) {
			c["down_block_types"] = []string{"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"}
		}, "down_block_types[0] = DownBlock2D but the weights' down_blocks.0 has down_blocks.0.attentions.N"},
		{"sd15", "class", func(c map[string]any) { c["_class_name"] = "SD3Transformer2DModel" },
			"_class_name = SD3Transformer2DModel but the weights are a sd15 model (want UNet2DConditionModel)"},
		{"sd35", "in_channels", func(c map[string]any) { c["in_channels"] = 64 }, "in_channels = 64 but pos_embed.proj.weight has 16 input channels"},
		{"sd35", "patch_size", func(c map[string]any) { c["patch_size"] = 1 }, "patch_size = 1 but pos_embed.proj.weight has 2×2 patches"},
		{"sd35", "num_layers", func(c map[string]any) { c["num_layers"] = 38 }, "num_layers = 38 but the weights have 3 transformer_blocks.N"},
		{"sd35", "heads", func(c map[string]any) { c["num_attention_heads"] = 38 },
			"num_attention_heads × attention_head_dim = 38 × 32 = 1216 but pos_embed.proj.weight makes the hidden width 64"},
		{"sd35", "attention_head_dim", func(c map[string]any) { c["attention_head_dim"], c["num_attention_heads"] = 16, 4 },
			"attention_head_dim = 16 but transformer_blocks.0.attn.norm_q.weight is 32 wide"},
		{"sd35", "qk_norm", func(c map[string]any) { c["qk_norm"] = nil }, "qk_norm = null but the weights have transformer_blocks.0.attn.norm_q.weight"},
		{"sd35", "joint_attention_dim", func(c map[string]any) { c["joint_attention_dim"] = 4096 }, "joint_attention_dim = 4096 but context_embedder.weight is 96 wide"},
		{"sd35", "caption_projection_dim", func(c map[string]any) { c["caption_projection_dim"] = 1536 }, "caption_projection_dim = 1536 but context_embedder.weight has 64 rows"},
		{"sd35", "pooled_projection_dim", func(c map[string]any) { c["pooled_projection_dim"] = 2048 },
			"pooled_projection_dim = 2048 but time_text_embed.text_embedder.linear_1.weight is 48 wide"},
		{"sd35", "out_channels", func(c map[string]any) { c["out_channels"] = 4 }, "out_channels = 4 but proj_out.weight has 16 channels per patch position"},
		{"sd35", "pos_embed_max_size", func(c map[string]any) { c["pos_embed_max_size"] = 192 },
			"pos_embed_max_size = 192 but pos_embed.pos_embed holds 576 positions (192² = 36864)"},
		{"sd35", "dual_attention_layers", func(c map[string]any) { c["dual_attention_layers"] = []int{0, 1, 2} },
			"dual_attention_layers = [0 1 2] but the weights have attn2 in blocks [0] (transformer_blocks.N.attn2)"},
		{"sd35", "no dual attention", func(c map[string]any) { c["dual_attention_layers"] = []int{} },
			"dual_attention_layers = [] but the weights have attn2 in blocks [0]"},
		{"sd35", "class", func(c map[string]any) { c["_class_name"] = "FluxTransformer2DModel" },
			"_class_name = FluxTransformer2DModel but the weights are a sd3 model (want SD3Transformer2DModel)"},
	} {
		t.Run(tc.fixture+"/"+tc.name, func(t *testing.T) {
			f := loadFixture(t, tc.fixture)
			cfg := cloneCfg(t, f.Config)
			tc.edit(cfg)
			dir := f.write(t, cfg)
			_, err := describe(t, dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), filepath.Join(dir, "config.json")+" disagrees with the weights") {
				t.Errorf("err %v\nwant %q", err, tc.want)
			}
		})
	}
}
