package lora

import (
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// denseOf returns B·A in float64 as a Mat-like slice.
func prod64(b, a Mat) []float64 {
	out := make([]float64, b.Rows*a.Cols)
	addRows(out, a.Cols, 0, 1, b, a, 0, b.Rows)
	return out
}

func scaled(x []float64, s float64) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = s * v
	}
	return out
}

// place puts rows [src, src+n) of d (in columns) at rows dst of a fresh
// [out × in] delta.
func place(e map[string][]float64, m *Model, layer string, dst int, d []float64, in, src, n int) {
	l, ok := m.Layer(layer)
	if !ok {
		panic("unknown layer " + layer)
	}
	if e[layer] == nil {
		e[layer] = make([]float64, l.Out*l.In)
	}
	for i := 0; i < n; i++ {
		for j := 0; j < in; j++ {
			e[layer][(dst+i)*in+j] += d[(src+i)*in+j]
		}
	}
}

func applyOne(t *testing.T, m *Model, path string, s float64, base BaseWeights) (*File, *Mapping, *Plan) {
	t.Helper()
	f, err := Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	mp, err := m.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	p, err := BuildSide(m, []*Mapping{mp}, []float64{s}, base, nil)
	if err != nil {
		t.Fatal(err)
	}
	return f, mp, p
}

func TestKeyFormats(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	bfl, wb := sampleModel(t, layout.FluxBFL, "")
	dif, wd := sampleModel(t, layout.FluxDiffusers, "")
	pfx := "model.diffusion_model."
	bflP, wbp := sampleModel(t, layout.FluxBFL, pfx)

	t.Run("comfyui onto diffusers", func(t *testing.T) {
		ts, b, a := loraPair(r, "diffusion_model.double_blocks.0.img_attn.qkv", "kohya", 4, 768, 256, 8)
		f, mp, p := applyOne(t, dif, writeLoRA(t, "comfy.safetensors", nil, safetensors.F32, ts...), 1, nil)
		if f.Format != FormatComfyUI || len(mp.Targets) != 1 || len(mp.Unmatched) != 0 {
			t.Fatalf("format %s targets %d unmatched %v", f.Format, len(mp.Targets), mp.Unmatched)
		}
		d := scaled(prod64(b, a), 2)
		e := map[string][]float64{}
		for i, n := range []string{"to_q", "to_k", "to_v"} {
			place(e, dif, "transformer_blocks.0.attn."+n, 0, d, 256, 256*i, 256)
		}
		checkSide(t, p, wd, e)
	})
	t.Run("xlabs onto bfl and diffusers", func(t *testing.T) {
		t1, b1, a1 := loraPair(r, "double_blocks.0.processor.qkv_lora2", "xlabs", 4, 768, 256, 0)
		t2, b2, a2 := loraPair(r, "single_blocks.1.processor.qkv_lora", "xlabs", 4, 768, 256, 0)
		t3, b3, a3 := loraPair(r, "single_blocks.1.processor.proj_lora", "xlabs", 4, 256, 1280, 0)
		path := writeLoRA(t, "xlabs.safetensors", nil, safetensors.BF16, append(append(t1, t2...), t3...)...)
		// The file is BF16: the oracle uses the stored (rounded) values.
		f, err := Parse(path)
		if err != nil {
			t.Fatal(err)
		}
		if f.Format != FormatXLabs {
			t.Fatalf("format %s", f.Format)
		}
		for _, mod := range f.Modules {
			switch {
			case strings.Contains(mod.Key, "qkv_lora2"):
				b1, a1 = mod.Up, mod.Down
			case strings.Contains(mod.Key, "qkv_lora"):
				b2, a2 = mod.Up, mod.Down
			default:
				b3, a3 = mod.Up, mod.Down
			}
			if mod.Scale != 1 {
				t.Errorf("%s: scale %v, want 1 (XLabs has no alpha)", mod.Key, mod.Scale)
			}
		}
		_, _, p := applyOne(t, bfl, path, 0.7, nil)
		e := map[string][]float64{}
		place(e, bfl, "double_blocks.0.txt_attn.qkv", 0, scaled(prod64(b1, a1), 0.7), 256, 0, 768)
		place(e, bfl, "single_blocks.1.linear1", 0, scaled(prod64(b2, a2), 0.7), 256, 0, 768)
		place(e, bfl, "single_blocks.1.linear2", 0, scaled(prod64(b3, a3), 0.7), 1280, 0, 256)
		checkSide(t, p, wb, e)
		_, _, p = applyOne(t, dif, path, 0.7, nil)
		e = map[string][]float64{}
		for i, n := range []string{"add_q_proj", "add_k_proj", "add_v_proj"} {
			place(e, dif, "transformer_blocks.0.attn."+n, 0, scaled(prod64(b1, a1), 0.7), 256, 256*i, 256)
		}
		for i, n := range []string{"to_q", "to_k", "to_v"} {
			place(e, dif, "single_transformer_blocks.1.attn."+n, 0, scaled(prod64(b2, a2), 0.7), 256, 256*i, 256)
		}
		place(e, dif, "single_transformer_blocks.1.proj_out", 0, scaled(prod64(b3, a3), 0.7), 1280, 0, 256)
		checkSide(t, p, wd, e)
	})
	t.Run("onetrainer onto prefixed bfl", func(t *testing.T) {
		ts, b, a := loraPair(r, "lora_transformer_single_transformer_blocks_0_attn_to_k", "kohya", 8, 256, 256, 4)
		t2, b2, a2 := loraPair(r, "lora_transformer_transformer_blocks_1_norm1_context_linear", "kohya", 8, 1536, 256, 4)
		f, _, p := applyOne(t, bflP, writeLoRA(t, "ot.safetensors", nil, safetensors.F16, append(ts, t2...)...), 1, nil)
		if f.Format != FormatOneTrainer {
			t.Fatalf("format %s", f.Format)
		}
		b, a = f.Modules[0].Up, f.Modules[0].Down // F16-rounded
		b2, a2 = f.Modules[1].Up, f.Modules[1].Down
		if !strings.Contains(f.Modules[0].Key, "single") {
			b, a, b2, a2 = b2, a2, b, a
		}
		e := map[string][]float64{}
		place(e, bflP, pfx+"single_blocks.0.linear1", 256, scaled(prod64(b, a), 0.5), 256, 0, 256)
		place(e, bflP, pfx+"double_blocks.1.txt_mod.lin", 0, scaled(prod64(b2, a2), 0.5), 256, 0, 1536)
		checkSide(t, p, wbp, e)
	})
	t.Run("peft without metadata has scale 1", func(t *testing.T) {
		ts, b, a := loraPair(r, "transformer.single_transformer_blocks.2.proj_out", "peft", 4, 256, 1280, 0)
		f, _, p := applyOne(t, bfl, writeLoRA(t, "peft.safetensors", nil, safetensors.F32, ts...), 1, nil)
		if f.Format != FormatDiffusers || f.Modules[0].Scale != 1 {
			t.Fatalf("format %s scale %v", f.Format, f.Modules[0].Scale)
		}
		e := map[string][]float64{}
		place(e, bfl, "single_blocks.2.linear2", 0, prod64(b, a), 1280, 0, 256)
		checkSide(t, p, wb, e)
	})
}

func TestNetworkTypes(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	bfl, wb := sampleModel(t, layout.FluxBFL, "")
	m64 := func(x Mat) []float64 {
		o := make([]float64, len(x.Data))
		for i, v := range x.Data {
			o[i] = float64(v)
		}
		return o
	}
	mat := func(rows, cols int) Mat { return Mat{rows, cols, randMat(r, rows, cols)} }
	shape := func(x Mat) []int64 { return []int64{int64(x.Rows), int64(x.Cols)} }

	t.Run("loha", func(t *testing.T) {
		k := "lora_unet_double_blocks_0_img_mlp_0"
		w1a, w1b, w2a, w2b := mat(1024, 2), mat(2, 256), mat(1024, 2), mat(2, 256)
		path := writeLoRA(t, "loha.safetensors", nil, safetensors.F32,
			tt{k + ".hada_w1_a", shape(w1a), w1a.Data}, tt{k + ".hada_w1_b", shape(w1b), w1b.Data},
			tt{k + ".hada_w2_a", shape(w2a), w2a.Data}, tt{k + ".hada_w2_b", shape(w2b), w2b.Data},
			tt{k + ".alpha", nil, []float32{4}})
		f, _, p := applyOne(t, bfl, path, 0.5, nil)
		if f.Modules[0].Type != TypeLoHa || f.Modules[0].Scale != 2 || p.Report.LoRAs[0].Factored != 1 {
			t.Fatalf("type %s scale %v report %+v", f.Modules[0].Type, f.Modules[0].Scale, p.Report.LoRAs[0])
		}
		d1, d2 := prod64(w1a, w1b), prod64(w2a, w2b)
		for i := range d1 {
			d1[i] *= d2[i] * 0.5 * 2
		}
		e := map[string][]float64{}
		place(e, bfl, "double_blocks.0.img_mlp.0", 0, d1, 256, 0, 1024)
		checkSide(t, p, wb, e)
	})
	kron64 := func(x, y []float64, p, q, s, u int) []float64 {
		out := make([]float64, p*s*q*u)
		for i := 0; i < p; i++ {
			for j := 0; j < q; j++ {
				for k := 0; k < s; k++ {
					for l := 0; l < u; l++ {
						out[(i*s+k)*(q*u)+j*u+l] = x[i*q+j] * y[k*u+l]
					}
				}
			}
		}
		return out
	}
	t.Run("lokr decomposed w2", func(t *testing.T) {
		k := "lycoris_double_blocks_0_img_mlp_0"
		w1, w2a, w2b := mat(4, 4), mat(256, 2), mat(2, 64)
		path := writeLoRA(t, "lokr.safetensors", nil, safetensors.F32,
			tt{k + ".lokr_w1", shape(w1), w1.Data}, tt{k + ".lokr_w2_a", shape(w2a), w2a.Data},
			tt{k + ".lokr_w2_b", shape(w2b), w2b.Data}, tt{k + ".alpha", nil, []float32{1}})
		f, _, p := applyOne(t, bfl, path, 1, nil)
		if f.Format != FormatLyCORIS || f.Modules[0].Type != TypeLoKr || f.Modules[0].Scale != 0.5 || p.Report.LoRAs[0].Factored != 1 {
			t.Fatalf("format %s type %s scale %v report %+v", f.Format, f.Modules[0].Type, f.Modules[0].Scale, p.Report.LoRAs[0])
		}
		d := scaled(kron64(m64(w1), prod64(w2a, w2b), 4, 4, 256, 64), 0.5)
		e := map[string][]float64{}
		place(e, bfl, "double_blocks.0.img_mlp.0", 0, d, 256, 0, 1024)
		checkSide(t, p, wb, e)
	})
	t.Run("lokr full is dense with scale 1", func(t *testing.T) {
		k := "lora_unet_double_blocks_1_img_mlp_0"
		w1, w2 := mat(4, 4), mat(256, 64)
		path := writeLoRA(t, "lokr-full.safetensors", nil, safetensors.F32,
			tt{k + ".lokr_w1", shape(w1), w1.Data}, tt{k + ".lokr_w2", shape(w2), w2.Data}, tt{k + ".alpha", nil, []float32{7}})
		f, _, p := applyOne(t, bfl, path, 1, nil)
		if f.Modules[0].Scale != 1 || len(p.Report.LoRAs[0].Dense) != 1 || !p.Report.Layers[0].Dense {
			t.Fatalf("scale %v report %+v", f.Modules[0].Scale, p.Report)
		}
		e := map[string][]float64{}
		place(e, bfl, "double_blocks.1.img_mlp.0", 0, kron64(m64(w1), m64(w2), 4, 4, 256, 64), 256, 0, 1024)
		checkSide(t, p, wb, e)
	})
	t.Run("full diff with bias", func(t *testing.T) {
		k := "lora_unet_single_blocks_0_linear2"
		d, db := mat(256, 1280), randMat(r, 256, 1)
		path := writeLoRA(t, "diff.safetensors", nil, safetensors.F32,
			tt{k + ".diff", shape(d), d.Data}, tt{k + ".diff_b", []int64{256}, db})
		f, _, p := applyOne(t, bfl, path, 0.25, nil)
		if f.Modules[0].Type != TypeFull || f.Modules[0].Scale != 1 {
			t.Fatalf("type %s scale %v", f.Modules[0].Type, f.Modules[0].Scale)
		}
		e := map[string][]float64{}
		place(e, bfl, "single_blocks.0.linear2", 0, scaled(m64(d), 0.25), 1280, 0, 256)
		checkSide(t, p, wb, e)
		sl := p.Layer("single_blocks.0.linear2")
		for i := range db {
			if math.Abs(float64(sl.Bias[i])-0.25*float64(db[i])) > 1e-7 {
				t.Fatalf("bias[%d] %v, want %v", i, sl.Bias[i], 0.25*db[i])
			}
		}
	})
	t.Run("dora per output", func(t *testing.T) {
		k := "transformer.transformer_blocks.0.attn.to_out.0"
		ts, b, a := loraPair(r, k, "peft", 4, 256, 256, 0)
		mag := make([]float32, 256)
		for i := range mag {
			mag[i] = 0.5 + r.Float32()
		}
		ts = append(ts, tt{k + ".lora_magnitude_vector", []int64{256}, mag})
		path := writeLoRA(t, "dora.safetensors", map[string]string{"lora_adapter_metadata": `{"r": 4, "lora_alpha": 2}`}, safetensors.F32, ts...)
		layer := "double_blocks.0.img_attn.proj"
		if _, err := BuildSideFile(bfl, path); err == nil || !strings.Contains(err.Error(), "DoRA needs the base weight") {
			t.Fatalf("DoRA without base: err %v", err)
		}
		base := func(name string) ([]float32, error) { return wb.get(name), nil }
		f, _, p := applyOne(t, bfl, path, 0.6, base)
		if !f.Modules[0].DoRA || len(p.Report.LoRAs[0].Dense) != 1 {
			t.Fatalf("dora %v report %+v", f.Modules[0].DoRA, p.Report.LoRAs[0])
		}
		// W' = m·(W+sΔW)/‖row‖, applied as strength·(W'−W).
		d := prod64(b, a)
		e := map[string][]float64{layer: make([]float64, 256*256)}
		for i := 0; i < 256; i++ {
			var n float64
			row := make([]float64, 256)
			for j := range row {
				row[j] = float64(wb.get(layer)[i*256+j]) + 0.5*d[i*256+j]
				n += row[j] * row[j]
			}
			n = math.Sqrt(n)
			for j := range row {
				e[layer][i*256+j] = 0.6 * (float64(mag[i])*row[j]/n - float64(wb.get(layer)[i*256+j]))
			}
		}
		checkSide(t, p, wb, e)
	})
	t.Run("dora per input (kohya dora_scale [1, in])", func(t *testing.T) {
		k := "lora_unet_double_blocks_1_txt_attn_proj"
		ts, b, a := loraPair(r, k, "kohya", 4, 256, 256, 8)
		mag := make([]float32, 256)
		for i := range mag {
			mag[i] = 0.5 + r.Float32()
		}
		ts = append(ts, tt{k + ".dora_scale", []int64{1, 256}, mag})
		layer := "double_blocks.1.txt_attn.proj"
		base := func(name string) ([]float32, error) { return wb.get(name), nil }
		f, _, p := applyOne(t, bfl, writeLoRA(t, "dora-in.safetensors", nil, safetensors.F32, ts...), 1, base)
		if !f.Modules[0].MagnitudePerInput {
			t.Fatal("magnitude [1, 256] not read as per input column")
		}
		d := prod64(b, a)
		w := wb.get(layer)
		norms := make([]float64, 256)
		for i := 0; i < 256; i++ {
			for j := 0; j < 256; j++ {
				v := float64(w[i*256+j]) + 2*d[i*256+j]
				norms[j] += v * v
			}
		}
		e := map[string][]float64{layer: make([]float64, 256*256)}
		for i := 0; i < 256; i++ {
			for j := 0; j < 256; j++ {
				v := float64(w[i*256+j]) + 2*d[i*256+j]
				e[layer][i*256+j] = float64(mag[j])*v/math.Sqrt(norms[j]) - float64(w[i*256+j])
			}
		}
		checkSide(t, p, wb, e)
	})
}

// BuildSideFile parses, maps and builds with strength 1 and no base
// weights (test shorthand).
func BuildSideFile(m *Model, path string) (*Plan, error) {
	f, err := Parse(path)
	if err != nil {
		return nil, err
	}
	mp, err := m.Map(f)
	if err != nil {
		return nil, err
	}
	return BuildSide(m, []*Mapping{mp}, []float64{1}, nil, nil)
}

func TestBadLoRAs(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 32))
	bfl, _ := sampleModel(t, layout.FluxBFL, "")
	k := "lora_unet_double_blocks_0_img_attn_qkv"
	good, _, _ := loraPair(r, k, "kohya", 4, 768, 256, 4)
	tests := []struct {
		name  string
		file  func(t *testing.T) string
		wants []string
	}{
		{"truncated", func(t *testing.T) string {
			p := writeLoRA(t, "trunc.safetensors", nil, safetensors.F32, good...)
			st, _ := os.Stat(p)
			if err := os.Truncate(p, st.Size()-100); err != nil {
				t.Fatal(err)
			}
			return p
		}, []string{"trunc.safetensors"}},
		{"rank mismatch", func(t *testing.T) string {
			return writeLoRA(t, "rank.safetensors", nil, safetensors.F32,
				tt{k + ".lora_down.weight", []int64{4, 256}, randMat(r, 4, 256)}, tt{k + ".lora_up.weight", []int64{768, 3}, randMat(r, 768, 3)})
		}, []string{"rank.safetensors", k + ".lora_up.weight", "rank mismatch"}},
		{"wrong in-features", func(t *testing.T) string {
			return writeLoRA(t, "in.safetensors", nil, safetensors.F32,
				tt{k + ".lora_down.weight", []int64{4, 100}, randMat(r, 4, 100)}, tt{k + ".lora_up.weight", []int64{768, 4}, randMat(r, 768, 4)})
		}, []string{"in.safetensors", k, "in-features 100", "has 256"}},
		{"wrong out rows", func(t *testing.T) string {
			return writeLoRA(t, "out.safetensors", nil, safetensors.F32,
				tt{k + ".lora_down.weight", []int64{4, 256}, randMat(r, 4, 256)}, tt{k + ".lora_up.weight", []int64{700, 4}, randMat(r, 700, 4)})
		}, []string{"out.safetensors", k, "700 output rows"}},
		{"alpha bad shape", func(t *testing.T) string {
			return writeLoRA(t, "alpha.safetensors", nil, safetensors.F32, append(good[:2:2], tt{k + ".alpha", []int64{2}, []float32{4, 4}})...)
		}, []string{"alpha.safetensors", k + ".alpha", "scalar"}},
		{"nan", func(t *testing.T) string {
			up := randMat(r, 768, 4)
			up[77] = float32(math.NaN())
			return writeLoRA(t, "nan.safetensors", nil, safetensors.BF16,
				tt{k + ".lora_down.weight", []int64{4, 256}, randMat(r, 4, 256)}, tt{k + ".lora_up.weight", []int64{768, 4}, up})
		}, []string{"nan.safetensors", k + ".lora_up.weight", "non-finite", "element 77"}},
		{"inf f16", func(t *testing.T) string {
			down := randMat(r, 4, 256)
			down[300] = float32(math.Inf(-1))
			return writeLoRA(t, "inf16.safetensors", nil, safetensors.F16,
				tt{k + ".lora_down.weight", []int64{4, 256}, down}, tt{k + ".lora_up.weight", []int64{768, 4}, randMat(r, 768, 4)})
		}, []string{"inf16.safetensors", k + ".lora_down.weight", "non-finite value -Inf", "element 300"}},
		{"inf f32, first of two bad tensors in file order", func(t *testing.T) string {
			down, up := randMat(r, 4, 256), randMat(r, 768, 4)
			down[5], up[9] = float32(math.Inf(1)), float32(math.NaN())
			return writeLoRA(t, "inf32.safetensors", nil, safetensors.F32,
				tt{k + ".lora_down.weight", []int64{4, 256}, down}, tt{k + ".lora_up.weight", []int64{768, 4}, up})
		}, []string{"inf32.safetensors", k + ".lora_down.weight", "non-finite value +Inf", "element 5"}},
		{"only down", func(t *testing.T) string {
			return writeLoRA(t, "half.safetensors", nil, safetensors.F32, good[0])
		}, []string{"half.safetensors", "only one of down/up"}},
		{"int dtype", func(t *testing.T) string {
			p := writeLoRA(t, "int.safetensors", nil, safetensors.F32, good...)
			_ = p
			path := t.TempDir() + "/int.safetensors"
			if err := safetensors.WriteFile(path, nil, []safetensors.WriteTensor{{Name: k + ".lora_down.weight", DType: safetensors.I32, Shape: []int64{1}, Data: make([]byte, 4)}}); err != nil {
				t.Fatal(err)
			}
			return path
		}, []string{"int.safetensors", "dtype I32"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := BuildSideFile(bfl, tc.file(t))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// SDXL: kohya (LDM and diffusers flattened), PEFT and text-encoder keys
// onto an LDM-named single-file layer set.
func TestSDXLMapping(t *testing.T) {
	r := rand.New(rand.NewPCG(41, 42))
	p := "model.diffusion_model."
	layers := []Layer{
		{p + "input_blocks.4.1.transformer_blocks.0.attn1.to_q", 640, 640},
		{p + "output_blocks.0.1.transformer_blocks.1.ff.net.2", 1280, 5120},
		{p + "label_emb.0.0", 1280, 2816},
		{"conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj", 768, 768},
	}
	info, err := layout.DetectInfo([]string{p + "label_emb.0.0.weight", p + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"})
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	var ts []tt
	for _, x := range []struct {
		key     string
		out, in int
		style   string
	}{
		{"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640, "kohya"},
		{"unet.up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2", 1280, 5120, "peft"},
		{"lora_unet_label_emb_0_0", 1280, 2816, "kohya"},
		{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, "kohya"},
		{"lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, "kohya"},
	} {
		y, _, _ := loraPair(r, x.key, x.style, 2, x.out, x.in, 0)
		ts = append(ts, y...)
	}
	f, err := Parse(writeLoRA(t, "sdxl.safetensors", map[string]string{"ss_base_model_version": "sdxl_base_v1-0"}, safetensors.F32, ts...))
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
	want := map[string]string{
		"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": layers[0].Name,
		"unet.up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2":          layers[1].Name,
		"lora_unet_label_emb_0_0":                               layers[2].Name,
		"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": layers[3].Name,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s → %q, want %q", k, got[k], v)
		}
	}
	if len(mp.Unmatched) != 1 || mp.Unmatched[0].Key != "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" {
		t.Errorf("unmatched %+v, want the te2 module", mp.Unmatched)
	}
	if f.Format != FormatMixed {
		t.Errorf("format %s, want mixed (kohya + diffusers keys)", f.Format)
	}
}
