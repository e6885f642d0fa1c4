package lora

import (
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// The merged LoRA written from a plan is the exact concatenation: applied
// alone at strength 1 it gives the same deltas as the inputs at their
// strengths, on either layout.
func TestWriteLoRARoundTrip(t *testing.T) {
	c := makeCross(t)
	for _, tc := range []struct {
		l      layout.Layout
		prefix string
	}{{layout.FluxBFL, "model.diffusion_model."}, {layout.FluxDiffusers, ""}} {
		t.Run(tc.l.String(), func(t *testing.T) {
			m, w := sampleModel(t, tc.l, tc.prefix)
			p := crossPlan(t, m, c, []float64{0.8, 1.3})
			out := filepath.Join(t.TempDir(), "merged.safetensors")
			if err := WriteLoRA(p, out); err != nil {
				t.Fatal(err)
			}
			st, err := safetensors.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			var from []map[string]any
			if err := json.Unmarshal([]byte(st.Metadata[MetaMergedFrom]), &from); err != nil || len(from) != 2 || from[1]["strength"] != 1.3 || from[0]["file"] != "peft.safetensors" {
				t.Errorf("merged_from %q (%v)", st.Metadata[MetaMergedFrom], err)
			}
			if _, ok := st.Lookup(p.Layers[0].Name + ".lora_A.weight"); !ok {
				t.Errorf("no key %s.lora_A.weight", p.Layers[0].Name)
			}
			st.Close()
			f, mp, back := applyOne(t, m, out, 1, nil)
			if len(mp.Unmatched) != 0 || f.Modules[0].Scale != 1 {
				t.Fatalf("unmatched %v scale %v", mp.Unmatched, f.Modules[0].Scale)
			}
			checkSide(t, back, w, c.expect(m, tc.l, 0.8, 1.3))
		})
	}
}

func TestWriteLoRARefusesDense(t *testing.T) {
	r := rand.New(rand.NewPCG(51, 52))
	bfl, _ := sampleModel(t, layout.FluxBFL, "")
	k := "lora_unet_single_blocks_0_linear2"
	d := randMat(r, 256, 1280)
	p, err := BuildSideFile(bfl, writeLoRA(t, "diff.safetensors", nil, safetensors.F32, tt{k + ".diff", []int64{256, 1280}, d}))
	if err != nil {
		t.Fatal(err)
	}
	err = WriteLoRA(p, filepath.Join(t.TempDir(), "x.safetensors"))
	if err == nil || !strings.Contains(err.Error(), "single_blocks.0.linear2") || !strings.Contains(err.Error(), "diff.safetensors:"+k) {
		t.Errorf("err %v", err)
	}
}

func TestSummarize(t *testing.T) {
	c := makeCross(t)
	for _, tc := range []struct {
		path string
		want Summary
	}{
		{c.kohyaPath, Summary{File: "kohya.safetensors", Format: FormatKohya, Types: []NetType{TypeLoRA}, Modules: 3, Ranks: []int{4}, Alphas: []float64{2}, Scales: []float64{0.5},
			Layout: layout.FluxBFL, BaseModel: "flux1", Architecture: "flux-1-dev/lora",
			Targets: []string{"unet:double_blocks_0_img_attn_qkv", "unet:final_layer_adaLN_modulation_1", "unet:single_blocks_1_linear1"}}},
		{c.peftPath, Summary{File: "peft.safetensors", Format: FormatDiffusers, Types: []NetType{TypeLoRA}, Modules: 8, Ranks: []int{4}, Alphas: []float64{8}, Scales: []float64{2},
			Layout: layout.FluxDiffusers, // pos_embed.proj fits no layout and does not outvote the rest
		}},
	} {
		f, err := Parse(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		got := Summarize(f)
		if tc.want.Targets == nil {
			got.Targets = nil
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.path, got, tc.want)
		}
	}
}
