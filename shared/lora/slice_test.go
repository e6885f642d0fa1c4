package lora

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Block-only slices (no img_in / x_embedder) still map fused ↔ split with
// split sizes from the slice's own shapes.
func TestSliceMapping(t *testing.T) {
	r := rand.New(rand.NewPCG(61, 62))
	peft, _, _ := loraPair(r, "transformer.transformer_blocks.0.attn.to_k", "peft", 2, 512, 512, 0)
	kohya, _, _ := loraPair(r, "lora_unet_double_blocks_0_img_attn_qkv", "kohya", 2, 1536, 512, 0)
	bflLayers := []Layer{{"double_blocks.0.img_attn.qkv", 1536, 512}, {"double_blocks.0.img_attn.proj", 512, 512}}
	difLayers := []Layer{{"transformer_blocks.0.attn.to_q", 512, 512}, {"transformer_blocks.0.attn.to_k", 512, 512},
		{"transformer_blocks.0.attn.to_v", 512, 512}, {"transformer_blocks.0.attn.to_out.0", 512, 512}}
	for _, tc := range []struct {
		name   string
		info   layout.Info
		layers []Layer
		file   []tt
		want   []Piece
	}{
		{"peft on bfl slice", layout.Info{Layout: layout.FluxBFL, Naming: layout.NamingBFL}, bflLayers, peft,
			[]Piece{{Layer: "double_blocks.0.img_attn.qkv", DstRow: 512, SrcRow: 0, Rows: 512}}},
		{"kohya on diffusers slice", layout.Info{Layout: layout.FluxDiffusers, Naming: layout.NamingDiffusers}, difLayers, kohya,
			[]Piece{{Layer: "transformer_blocks.0.attn.to_q", Rows: 512}, {Layer: "transformer_blocks.0.attn.to_k", SrcRow: 512, Rows: 512},
				{Layer: "transformer_blocks.0.attn.to_v", SrcRow: 1024, Rows: 512}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := NewModel(tc.info, tc.layers)
			if err != nil {
				t.Fatal(err)
			}
			f, err := Parse(writeLoRA(t, "s.safetensors", nil, safetensors.F32, tc.file...))
			if err != nil {
				t.Fatal(err)
			}
			mp, err := m.Map(f)
			if err != nil {
				t.Fatal(err)
			}
			if len(mp.Targets) != 1 || len(mp.Targets[0].Pieces) != len(tc.want) {
				t.Fatalf("targets %+v", mp.Targets)
			}
			for i, p := range mp.Targets[0].Pieces {
				if p != tc.want[i] {
					t.Errorf("piece %d: %+v, want %+v", i, p, tc.want[i])
				}
			}
			if err := mp.Strict(); err != nil {
				t.Errorf("strict: %v", err)
			}
		})
	}
	// Any block layer tells the hidden width (the MLP's input here).
	m, err := NewModel(layout.Info{Layout: layout.FluxBFL}, []Layer{{"double_blocks.0.img_mlp.0", 2048, 512}})
	if err != nil || m.Flux.Hidden != 512 || m.Flux.MLP != 2048 {
		t.Errorf("img_mlp.0 only: %+v, %v", m, err)
	}
	// A slice with no layer of known shape cannot tell its width.
	_, err = NewModel(layout.Info{Layout: layout.FluxBFL}, []Layer{{"double_blocks.0.adapter", 20, 10}})
	if err == nil || !strings.Contains(err.Error(), "hidden width") || !strings.Contains(err.Error(), "img_in.weight") {
		t.Errorf("err %v", err)
	}
}

func TestStrict(t *testing.T) {
	r := rand.New(rand.NewPCG(71, 72))
	m, _ := sampleModel(t, layout.FluxBFL, "")
	ts, _, _ := loraPair(r, "lora_unet_not_a_layer", "kohya", 2, 8, 8, 0)
	f, err := Parse(writeLoRA(t, "odd.safetensors", nil, safetensors.F32, append(ts, tt{"some.other.tensor", []int64{1}, []float32{1}})...))
	if err != nil {
		t.Fatal(err)
	}
	mp, err := m.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	err = mp.Strict()
	if err == nil || !strings.Contains(err.Error(), "odd.safetensors") || !strings.Contains(err.Error(), "lora_unet_not_a_layer") || !strings.Contains(err.Error(), "some.other.tensor") {
		t.Errorf("strict err %v", err)
	}
}
