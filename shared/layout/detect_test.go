package layout

import (
	"strings"
	"testing"
)

func TestDetect(t *testing.T) {
	bnb := func(n string) []string {
		return []string{n, n + ".absmax", n + ".quant_map", n + ".nested_absmax", n + ".nested_quant_map", n + ".quant_state.bitsandbytes__nf4"}
	}
	tests := []struct {
		name   string
		names  []string
		want   Info
		errHas string
	}{
		{"bfl bare", []string{"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.query_norm.scale"},
			Info{FluxBFL, NamingBFL, ""}, ""},
		{"bfl forge nf4", append(bnb("model.diffusion_model.single_blocks.0.linear1.weight"), "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
			Info{FluxBFL, NamingBFL, "model.diffusion_model."}, ""},
		{"flux diffusers", append(bnb("transformer_blocks.0.attn.to_q.weight"), "single_transformer_blocks.0.proj_mlp.weight", "x_embedder.weight"),
			Info{FluxDiffusers, NamingDiffusers, ""}, ""},
		{"sdxl ldm", []string{"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"},
			Info{SDXL, NamingLDM, "model.diffusion_model."}, ""},
		{"sdxl diffusers", append(bnb("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"), "add_embedding.linear_1.weight"),
			Info{SDXL, NamingDiffusers, ""}, ""},
		{"sd15 ldm", []string{"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "cond_stage_model.transformer.text_model.embeddings.position_ids"},
			Info{SD15, NamingLDM, "model.diffusion_model."}, ""},
		{"sd15 diffusers", []string{"unet.down_blocks.0.attentions.0.proj_in.weight", "unet.conv_in.weight"},
			Info{SD15, NamingDiffusers, "unet."}, ""},
		{"mixed", []string{"double_blocks.0.img_attn.qkv.weight", "single_transformer_blocks.0.proj_mlp.weight"}, Info{}, "several layouts"},
		{"unet without probe", []string{"input_blocks.4.1.proj_in.weight"}, Info{}, "neither SDXL"},
		{"nothing", []string{"foo.weight", "single_transformer_blocksX"}, Info{}, "no known layout"},
		{"only side keys", []string{"double_blocks.0.img_attn.qkv.weight.absmax"}, Info{}, "no known layout"},
		{"single_blocks without leaf", []string{"single_blocks.0.norm.query_norm.scale"}, Info{}, "no known layout"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DetectInfo(tc.names)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("err %v, want containing %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
			l, _ := Detect(tc.names)
			if l != tc.want.Layout {
				t.Errorf("Detect %s, want %s", l, tc.want.Layout)
			}
		})
	}
}

// Full generated Flux tensor lists detect as their layout.
func TestDetectGenerated(t *testing.T) {
	for _, l := range []Layout{FluxBFL, FluxDiffusers} {
		ts, _ := FluxDev().Tensors(l)
		var names []string
		for _, s := range ts {
			names = append(names, s.Name)
		}
		got, err := Detect(names)
		if err != nil || got != l {
			t.Errorf("%s: got %s, %v", l, got, err)
		}
	}
}

func TestLayoutText(t *testing.T) {
	for _, l := range []Layout{Unknown, FluxBFL, FluxDiffusers, SDXL, SD15} {
		b, _ := l.MarshalText()
		var back Layout
		if err := back.UnmarshalText(b); err != nil || back != l {
			t.Errorf("%s: round trip %s, %v", l, back, err)
		}
	}
	var l Layout
	if err := l.UnmarshalText([]byte("flux")); err == nil {
		t.Error("unknown name parsed")
	}
}

func TestUNetNames(t *testing.T) {
	tests := []struct {
		l         Layout
		ldm, diff string
	}{
		{SDXL, "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"},
		{SDXL, "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj", "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"},
		{SDXL, "middle_block.1.proj_in", "mid_block.attentions.0.proj_in"},
		{SDXL, "middle_block.2.in_layers.2", "mid_block.resnets.1.conv1"},
		{SDXL, "output_blocks.0.1.transformer_blocks.0.attn2.to_k", "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"},
		{SDXL, "output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"},
		{SDXL, "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"},
		{SDXL, "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"},
		{SDXL, "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"},
		{SDXL, "input_blocks.1.0.emb_layers.1", "down_blocks.0.resnets.0.time_emb_proj"},
		{SDXL, "input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"},
		{SDXL, "input_blocks.0.0", "conv_in"},
		{SDXL, "out.2", "conv_out"},
		{SDXL, "label_emb.0.0", "add_embedding.linear_1"},
		{SDXL, "time_embed.2", "time_embedding.linear_2"},
		{SD15, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"},
		{SD15, "input_blocks.7.1.proj_in", "down_blocks.2.attentions.0.proj_in"},
		{SD15, "input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"},
		{SD15, "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"},
		{SD15, "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"},
		{SD15, "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"},
	}
	for _, tc := range tests {
		d, ok := UNetToDiffusers(tc.l, tc.ldm)
		if !ok || d != tc.diff {
			t.Errorf("%s: UNetToDiffusers(%s) = %q %v, want %s", tc.l, tc.ldm, d, ok, tc.diff)
		}
		b, ok := UNetToLDM(tc.l, tc.diff)
		if !ok || b != tc.ldm {
			t.Errorf("%s: UNetToLDM(%s) = %q %v, want %s", tc.l, tc.diff, b, ok, tc.ldm)
		}
	}
	for _, bad := range []string{"input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"} {
		// SDXL has no attention at the first level.
		if _, ok := UNetToDiffusers(SDXL, bad); ok && strings.HasPrefix(bad, "input") {
			t.Errorf("SDXL converted %s", bad)
		}
		if _, ok := UNetToLDM(SDXL, bad); ok && strings.HasPrefix(bad, "down") {
			t.Errorf("SDXL converted %s", bad)
		}
	}
	if _, ok := UNetToDiffusers(FluxBFL, "input_blocks.0.0"); ok {
		t.Error("flux layout converted a UNet name")
	}
}

func TestKohyaName(t *testing.T) {
	if got := KohyaName("lora_unet_", "double_blocks.0.img_attn.qkv"); got != "lora_unet_double_blocks_0_img_attn_qkv" {
		t.Error(got)
	}
}

// SD3 in both namings and FLUX.2 (whose x_embedder and
// single_transformer_blocks FLUX.1's diffusers names share) are told apart.
func TestDetectSD3Flux2(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  Info
	}{
		{[]string{"pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight", "context_embedder.weight"}, Info{Layout: SD3, Naming: NamingDiffusers}},
		{[]string{"model.diffusion_model.x_embedder.proj.weight", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, Info{Layout: SD3, Naming: NamingSAI, Prefix: "model.diffusion_model."}},
		{[]string{"x_embedder.weight", "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight",
			"transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"}, Info{Layout: Flux2, Naming: NamingDiffusers}},
	} {
		got, err := DetectInfo(tc.names)
		if err != nil || got != tc.want {
			t.Errorf("%v: %+v, %v; want %+v", tc.names, got, err, tc.want)
		}
	}
}
