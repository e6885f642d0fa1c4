package lora

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// familyModel builds the mapping model of a Flux-family configuration in
// one naming, minus the layers drop names.
func familyModel(t *testing.T, c layout.FluxConfig, l layout.Layout, prefix string, drop ...string) *Model {
	t.Helper()
	lin, err := c.Linears(l)
	if err != nil {
		t.Fatal(err)
	}
	skip := map[string]bool{}
	for _, d := range drop {
		skip[d] = true
	}
	var layers []Layer
	var names []string
	for _, li := range lin {
		if skip[li.Name] {
			continue
		}
		layers = append(layers, Layer{Name: prefix + li.Name, Out: li.Out, In: li.In})
		names = append(names, prefix+li.Name+".weight")
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatalf("%s model: %v", l, err)
	}
	return m
}

// LoRAs in either naming map onto Chroma, onto a BFL model without
// vector_in, onto Fill and onto a pruned model: the widths come from the
// layers present, the split sizes from the model's own shapes.
func TestMapFluxFamily(t *testing.T) {
	chroma := layout.Chroma()
	chroma.Hidden, chroma.MLP, chroma.DoubleBlocks, chroma.SingleBlocks = 256, 1024, 2, 3
	chroma.Approximator = layout.Approximator{InDim: 64, Hidden: 96, Layers: 2}
	fill := layout.FluxSample()
	fill.InChannels, fill.OutCh = 384, 64
	pruned := layout.FluxSample()
	pruned.DoubleBlocks = 1
	r := rand.New(rand.NewPCG(81, 82))
	h, m := 256, 1024
	// The same modules in both namings: fused (kohya, BFL names) and split
	// (PEFT, diffusers names).
	kohya := [][]tt{}
	for _, k := range []struct {
		key     string
		out, in int
	}{
		{"lora_unet_double_blocks_0_img_attn_qkv", 3 * h, h},
		{"lora_unet_single_blocks_1_linear1", 3*h + m, h},
		{"lora_unet_single_blocks_1_linear2", h, h + m},
		{"lora_unet_txt_in", h, 4096},
	} {
		ts, _, _ := loraPair(r, k.key, "kohya", 2, k.out, k.in, 2)
		kohya = append(kohya, ts)
	}
	peft := [][]tt{}
	for _, k := range []struct {
		key     string
		out, in int
	}{
		{"transformer.transformer_blocks.0.attn.to_k", h, h},
		{"transformer.single_transformer_blocks.1.proj_mlp", m, h},
		{"transformer.single_transformer_blocks.1.attn.to_v", h, h},
		{"transformer.context_embedder", h, 4096},
	} {
		ts, _, _ := loraPair(r, k.key, "peft", 2, k.out, k.in, 0)
		peft = append(peft, ts)
	}
	var kohyaAll, peftAll []tt
	for _, ts := range kohya {
		kohyaAll = append(kohyaAll, ts...)
	}
	for _, ts := range peft {
		peftAll = append(peftAll, ts...)
	}
	kf, err := Parse(writeLoRA(t, "kohya.safetensors", nil, safetensors.F32, kohyaAll...))
	if err != nil {
		t.Fatal(err)
	}
	pf, err := Parse(writeLoRA(t, "peft.safetensors", nil, safetensors.F32, peftAll...))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  layout.FluxConfig
		drop []string // BFL names; their diffusers parts go too
	}{
		{"chroma", chroma, nil},
		{"no vector_in", layout.FluxSample(), []string{"vector_in.in_layer", "vector_in.out_layer"}},
		{"no time_in, vector_in, guidance_in", layout.FluxSample(), []string{"vector_in.in_layer", "vector_in.out_layer", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer"}},
		{"fill", fill, nil},
		{"pruned", pruned, nil},
	} {
		for _, l := range []layout.Layout{layout.FluxBFL, layout.FluxDiffusers} {
			for _, pre := range []string{"", "model.diffusion_model."} {
				if l == layout.FluxDiffusers && pre != "" {
					continue
				}
				t.Run(tc.name+"/"+l.String()+"/"+pre, func(t *testing.T) {
					drop := tc.drop
					if l == layout.FluxDiffusers {
						maps, _ := tc.cfg.RowMaps()
						drop = nil
						for _, d := range tc.drop {
							for _, rm := range maps {
								if rm.BFL == d {
									drop = append(drop, rm.Diffusers)
								}
							}
						}
					}
					mdl := familyModel(t, tc.cfg, l, pre, drop...)
					if mdl.Flux.Chroma != tc.cfg.Chroma || mdl.Flux.Hidden != h || mdl.Flux.MLP != m {
						t.Errorf("derived %+v", *mdl.Flux)
					}
					for _, f := range []*File{kf, pf} {
						mp, err := mdl.Map(f)
						if err != nil {
							t.Fatalf("%s: %v", f.Path, err)
						}
						if len(mp.Unmatched) != 0 || len(mp.Targets) != len(f.Modules) {
							t.Errorf("%s: %d targets of %d modules, unmatched %+v", f.Path, len(mp.Targets), len(f.Modules), mp.Unmatched)
						}
					}
				})
			}
		}
	}
}

// Text-encoder keys land on a bundled encoder stored in 4-bit (kohya
// lora_te1_/lora_te3_ and diffusers text_encoder.… onto ComfyUI's
// text_encoders.clip_l/t5xxl.transformer.…), and say why when it is not.
func TestMapBundledTextEncoders(t *testing.T) {
	pre := "model.diffusion_model."
	clip := "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
	t5 := "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
	lin, _ := layout.FluxSample().Linears(layout.FluxBFL)
	var layers []Layer
	var names []string
	for _, l := range lin {
		layers = append(layers, Layer{Name: pre + l.Name, Out: l.Out, In: l.In})
		names = append(names, pre+l.Name+".weight")
	}
	layers = append(layers, Layer{Name: clip, Out: 64, In: 64}, Layer{Name: t5, Out: 64, In: 64})
	names = append(names, clip+".weight", t5+".weight", "vae.decoder.conv_in.weight")
	info, err := layout.DetectInfo(names)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	m.NoteTensors(names)
	r := rand.New(rand.NewPCG(91, 92))
	var ts []tt
	for _, k := range []string{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
		"text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"} {
		style := "kohya"
		if !strings.HasPrefix(k, "lora_") {
			style = "peft"
		}
		p, _, _ := loraPair(r, k, style, 2, 64, 64, 0)
		ts = append(ts, p...)
	}
	f, err := Parse(writeLoRA(t, "te.safetensors", nil, safetensors.F32, ts...))
	if err != nil {
		t.Fatal(err)
	}
	mp, err := m.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, tg := range mp.Targets {
		got[tg.Module.Key] = tg.Pieces[0].Layer
	}
	for k, want := range map[string]string{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": clip, "lora_te3_encoder_block_0_layer_0_SelfAttention_q": t5,
		"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": clip} {
		if got[k] != want {
			t.Errorf("%s → %q, want %q", k, got[k], want)
		}
	}
	if len(mp.Unmatched) != 1 || !strings.Contains(mp.Unmatched[0].Reason, "bundles no text encoder 2") {
		t.Errorf("unmatched %+v", mp.Unmatched)
	}
}

// A pipeline folder's encoders, carried beside a diffusers-named
// transformer under the bundled prefixes (checkpoint.OpenModel), with
// CLIP named as transformers 5 saves it (no text_model.): kohya and PEFT
// text-encoder keys find them as they find a bundled file's.
func TestMapPipelineFolderTextEncoders(t *testing.T) {
	clip := "text_encoders.clip_l.transformer.encoder.layers.0.self_attn.q_proj"
	t5 := "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
	lin, _ := layout.FluxSample().Linears(layout.FluxDiffusers)
	var layers []Layer
	var names []string
	for _, l := range lin {
		layers = append(layers, Layer{Name: l.Name, Out: l.Out, In: l.In})
		names = append(names, l.Name+".weight")
	}
	layers = append(layers, Layer{Name: clip, Out: 64, In: 64}, Layer{Name: t5, Out: 64, In: 64})
	names = append(names, clip+".weight", t5+".weight", "vae.encoder.down_blocks.0.resnets.0.conv1.weight")
	info, err := layout.DetectInfo(names)
	if err != nil || info.Layout != layout.FluxDiffusers || info.Prefix != "" {
		t.Fatalf("%+v %v", info, err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	m.NoteTensors(names)
	r := rand.New(rand.NewPCG(93, 94))
	var ts []tt
	keys := map[string]string{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": clip, "lora_te3_encoder_block_0_layer_0_SelfAttention_q": t5,
		"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": clip}
	for k := range keys {
		style := "kohya"
		if !strings.HasPrefix(k, "lora_") {
			style = "peft"
		}
		p, _, _ := loraPair(r, k, style, 2, 64, 64, 0)
		ts = append(ts, p...)
	}
	f, err := Parse(writeLoRA(t, "te.safetensors", nil, safetensors.F32, ts...))
	if err != nil {
		t.Fatal(err)
	}
	mp, err := m.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, tg := range mp.Targets {
		got[tg.Module.Key] = tg.Pieces[0].Layer
	}
	for k, want := range keys {
		if got[k] != want {
			t.Errorf("%s → %q, want %q", k, got[k], want)
		}
	}
	if len(mp.Unmatched) != 0 {
		t.Errorf("unmatched %+v", mp.Unmatched)
	}
}
