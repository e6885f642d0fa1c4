package lora

import (
	"encoding/json"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/vmihailenco/msgpack/v5"
)

// crossLoRAs writes a diffusers/PEFT-keyed LoRA (scale from
// lora_adapter_metadata: alpha 8 / r 4 = 2) and a kohya BFL-keyed LoRA
// (alpha 2 / rank 4 = 0.5) over the sample Flux model (hidden 256, MLP 1024).
type crossLoRAs struct {
	peftPath, kohyaPath          string
	q, k, v, sv, smlp, nout, ff2 [2]Mat // B, A
	kqkv, klin1, kada            [2]Mat
}

func makeCross(t *testing.T) crossLoRAs {
	r := rand.New(rand.NewPCG(1, 2))
	var c crossLoRAs
	var ts []tt
	add := func(dst *[2]Mat, key string, out, in int) {
		x, b, a := loraPair(r, key, "peft", 4, out, in, 0)
		ts = append(ts, x...)
		*dst = [2]Mat{b, a}
	}
	add(&c.q, "transformer.transformer_blocks.0.attn.to_q", 256, 256)
	add(&c.k, "transformer.transformer_blocks.0.attn.to_k", 256, 256)
	add(&c.v, "transformer.transformer_blocks.0.attn.to_v", 256, 256)
	add(&c.sv, "transformer.single_transformer_blocks.1.attn.to_v", 256, 256)
	add(&c.smlp, "transformer.single_transformer_blocks.1.proj_mlp", 1024, 256)
	add(&c.nout, "transformer.norm_out.linear", 512, 256)
	add(&c.ff2, "transformer.transformer_blocks.1.ff.net.2", 256, 1024)
	var unused [2]Mat
	add(&unused, "transformer.pos_embed.proj", 256, 64)
	c.peftPath = writeLoRA(t, "peft.safetensors", map[string]string{"lora_adapter_metadata": `{"r": 4, "lora_alpha": 8}`}, safetensors.F32, ts...)
	ts = nil
	addK := func(dst *[2]Mat, key string, out, in int) {
		x, b, a := loraPair(r, key, "kohya", 4, out, in, 2)
		ts = append(ts, x...)
		*dst = [2]Mat{b, a}
	}
	addK(&c.kqkv, "lora_unet_double_blocks_0_img_attn_qkv", 768, 256)
	addK(&c.klin1, "lora_unet_single_blocks_1_linear1", 1792, 256)
	addK(&c.kada, "lora_unet_final_layer_adaLN_modulation_1", 512, 256)
	c.kohyaPath = writeLoRA(t, "kohya.safetensors", map[string]string{"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}, safetensors.F32, ts...)
	return c
}

// expect builds the oracle deltas from the reference correspondence written
// out by hand (not from shared/layout): sD·2 for the PEFT LoRA, sK·0.5 for
// kohya.
func (c crossLoRAs) expect(m *Model, l layout.Layout, sD, sK float64) map[string][]float64 {
	e := map[string][]float64{}
	at := func(name string) []float64 {
		ly, ok := m.Layer(name)
		if !ok {
			panic("oracle names unknown layer " + name)
		}
		if e[name] == nil {
			e[name] = make([]float64, ly.Out*ly.In)
		}
		return e[name]
	}
	d, k := 2*sD, 0.5*sK
	if l == layout.FluxBFL {
		p := "model.diffusion_model."
		qkv := at(p + "double_blocks.0.img_attn.qkv")
		addRows(qkv, 256, 0, d, c.q[0], c.q[1], 0, 256)
		addRows(qkv, 256, 256, d, c.k[0], c.k[1], 0, 256)
		addRows(qkv, 256, 512, d, c.v[0], c.v[1], 0, 256)
		addRows(qkv, 256, 0, k, c.kqkv[0], c.kqkv[1], 0, 768)
		l1 := at(p + "single_blocks.1.linear1")
		addRows(l1, 256, 512, d, c.sv[0], c.sv[1], 0, 256)
		addRows(l1, 256, 768, d, c.smlp[0], c.smlp[1], 0, 1024)
		addRows(l1, 256, 0, k, c.klin1[0], c.klin1[1], 0, 1792)
		ada := at(p + "final_layer.adaLN_modulation.1")
		addRows(ada, 256, 0, d, c.nout[0], c.nout[1], 256, 256)
		addRows(ada, 256, 256, d, c.nout[0], c.nout[1], 0, 256)
		addRows(ada, 256, 0, k, c.kada[0], c.kada[1], 0, 512)
		addRows(at(p+"double_blocks.1.img_mlp.2"), 1024, 0, d, c.ff2[0], c.ff2[1], 0, 256)
		return e
	}
	for i, n := range []string{"to_q", "to_k", "to_v"} {
		x := at("transformer_blocks.0.attn." + n)
		addRows(x, 256, 0, d, [3][2]Mat{c.q, c.k, c.v}[i][0], [3][2]Mat{c.q, c.k, c.v}[i][1], 0, 256)
		addRows(x, 256, 0, k, c.kqkv[0], c.kqkv[1], 256*i, 256)
		y := at("single_transformer_blocks.1.attn." + n)
		addRows(y, 256, 0, k, c.klin1[0], c.klin1[1], 256*i, 256)
	}
	addRows(at("single_transformer_blocks.1.attn.to_v"), 256, 0, d, c.sv[0], c.sv[1], 0, 256)
	mlp := at("single_transformer_blocks.1.proj_mlp")
	addRows(mlp, 256, 0, d, c.smlp[0], c.smlp[1], 0, 1024)
	addRows(mlp, 256, 0, k, c.klin1[0], c.klin1[1], 768, 1024)
	no := at("norm_out.linear")
	addRows(no, 256, 0, d, c.nout[0], c.nout[1], 0, 512)
	addRows(no, 256, 0, k, c.kada[0], c.kada[1], 256, 256)
	addRows(no, 256, 256, k, c.kada[0], c.kada[1], 0, 256)
	addRows(at("transformer_blocks.1.ff.net.2"), 1024, 0, d, c.ff2[0], c.ff2[1], 0, 256)
	return e
}

func TestSideCrossLayout(t *testing.T) {
	c := makeCross(t)
	for _, tc := range []struct {
		l      layout.Layout
		prefix string
	}{{layout.FluxBFL, "model.diffusion_model."}, {layout.FluxDiffusers, ""}} {
		t.Run(tc.l.String(), func(t *testing.T) {
			m, w := sampleModel(t, tc.l, tc.prefix)
			var maps []*Mapping
			for _, p := range []string{c.peftPath, c.kohyaPath} {
				f, err := Parse(p)
				if err != nil {
					t.Fatal(err)
				}
				mp, err := m.Map(f)
				if err != nil {
					t.Fatal(err)
				}
				maps = append(maps, mp)
			}
			if len(maps[0].Unmatched) != 1 || !strings.Contains(maps[0].Unmatched[0].Key, "pos_embed") {
				t.Errorf("unmatched %+v, want the pos_embed module", maps[0].Unmatched)
			}
			p, err := BuildSide(m, maps, []float64{0.8, 1.3}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			checkSide(t, p, w, c.expect(m, tc.l, 0.8, 1.3))

			// A strength change rewrites only that LoRA's columns.
			before := map[string][]float32{}
			for _, sl := range p.Layers {
				before[sl.Name] = slices.Clone(sl.B)
			}
			touched, err := p.SetStrength(1, -0.4)
			if err != nil {
				t.Fatal(err)
			}
			for _, tch := range touched {
				sl := p.Layer(tch.Layer)
				for r := 0; r < sl.Out; r++ {
					for col := 0; col < sl.Rank; col++ {
						in := col >= tch.Col && col < tch.Col+tch.Cols
						if !in && sl.B[r*sl.Rank+col] != before[sl.Name][r*sl.Rank+col] {
							t.Fatalf("layer %s: column %d outside LoRA 1's [%d,%d) changed", sl.Name, col, tch.Col, tch.Col+tch.Cols)
						}
					}
				}
			}
			checkSide(t, p, w, c.expect(m, tc.l, 0.8, -0.4))
			if _, err := p.SetStrength(2, 1); err == nil {
				t.Error("SetStrength on a LoRA that does not exist succeeded")
			}
		})
	}
}

func TestReportEncodes(t *testing.T) {
	c := makeCross(t)
	m, _ := sampleModel(t, layout.FluxBFL, "model.diffusion_model.")
	f, err := Parse(c.kohyaPath)
	if err != nil {
		t.Fatal(err)
	}
	if f.Format != FormatKohya || f.Meta.BaseModel != "flux1" || f.Meta.Architecture != "flux-1-dev/lora" {
		t.Errorf("format %s meta %+v", f.Format, f.Meta)
	}
	mp, _ := m.Map(f)
	p, err := BuildSide(m, []*Mapping{mp}, []float64{1}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(p.Report)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(j, &back); err != nil {
		t.Fatal(err)
	}
	if back.LayersTouched != 3 || back.LoRAs[0].Matched != 3 || back.LoRAs[0].Format != FormatKohya || back.SideBytes != p.Report.SideBytes {
		t.Errorf("json round trip: %s", j)
	}
	mb, err := msgpack.Marshal(p.Report)
	if err != nil {
		t.Fatal(err)
	}
	var back2 Report
	if err := msgpack.Unmarshal(mb, &back2); err != nil {
		t.Fatal(err)
	}
	if back2.LayersTouched != 3 || back2.LoRAs[0].Meta.BaseModel != "flux1" || len(back2.Layers) != 3 {
		t.Errorf("msgpack round trip: %+v", back2)
	}
}
