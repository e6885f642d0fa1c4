package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// mergeFixture writes the sample model (nested or not) and both sample
// LoRAs into a temporary directory.
func mergeFixture(t *testing.T, nested bool) (model, kohya, peft string) {
	t.Helper()
	dir := t.TempDir()
	model = filepath.Join(dir, samples.ModelFile)
	if err := samples.WriteModel(model, samples.ModelOptions{Seed: 2, Nested: nested}); err != nil {
		t.Fatal(err)
	}
	if err := samples.WriteLoRAs(dir, 5); err != nil {
		t.Fatal(err)
	}
	return model, filepath.Join(dir, samples.KohyaLoRAFile), filepath.Join(dir, samples.PEFTLoRAFile)
}

func readAll(t *testing.T, path string) map[string][]float32 {
	t.Helper()
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]float32{}
	for _, ti := range f.Tensors {
		b, _ := f.TensorData(ti)
		v := make([]float32, ti.NumElements())
		switch ti.DType {
		case safetensors.BF16:
			half.DecodeBF16(v, b)
		case safetensors.F32:
			half.DecodeF32(v, b)
		default:
			continue
		}
		out[ti.Name] = v
	}
	return out
}

const qkv = "double_blocks.0.img_attn.qkv"

// qkvDelta is Σ sᵢ·(alphaᵢ/rᵢ)·Bᵢ·Aᵢ on the qkv of double block 0 [768 ×
// 256], written from the files with the row offsets of the Flux tables
// (kohya on the fused qkv; PEFT's to_q/to_k/to_v at rows 0, 256, 512).
func qkvDelta(t *testing.T, kohya string, sk float64, peft string, sp float64) []float64 {
	t.Helper()
	const out, in = 768, 256
	d := make([]float64, out*in)
	add := func(ts map[string][]float32, mod, down, up string, row int, s float64) {
		a, b, al := ts[mod+down], ts[mod+up], ts[mod+".alpha"]
		if a == nil || b == nil || al == nil {
			t.Fatalf("module %s missing", mod)
		}
		r := len(a) / in
		sc := s * float64(al[0]) / float64(r)
		for i := 0; i < len(b)/r; i++ {
			for j := 0; j < in; j++ {
				var acc float64
				for k := 0; k < r; k++ {
					acc += float64(b[i*r+k]) * float64(a[k*in+j])
				}
				d[(row+i)*in+j] += sc * acc
			}
		}
	}
	if kohya != "" {
		add(readAll(t, kohya), "lora_unet_double_blocks_0_img_attn_qkv", ".lora_down.weight", ".lora_up.weight", 0, sk)
	}
	if peft != "" {
		ts := readAll(t, peft)
		for i, p := range []string{"to_q", "to_k", "to_v"} {
			add(ts, "transformer.transformer_blocks.0.attn."+p, ".lora_A.weight", ".lora_B.weight", i*256, sp)
		}
	}
	return d
}

func dqWeight(t *testing.T, path, name string) ([]float32, nf4.Weight) {
	t.Helper()
	in, err := openMergeInput(path)
	if err != nil {
		t.Fatal(err)
	}
	defer in.f.Close()
	w := in.byName[name]
	if w == nil {
		t.Fatalf("%s: no 4-bit weight %s", path, name)
	}
	v, err := w.DequantizeF32(in.read)
	if err != nil {
		t.Fatal(err)
	}
	roundToLogical(v, w.State.DType)
	return v, *w
}

// roundToLogical rounds dequantized values to the weight's logical dtype:
// dq(W) is what bitsandbytes' dequantize_4bit returns, in that dtype.
func roundToLogical(v []float32, dt nf4.DType) {
	for i, x := range v {
		switch dt {
		case nf4.BFloat16:
			v[i] = half.BF16ToF32(half.F32ToBF16(x))
		case nf4.Float16:
			v[i] = half.F16ToF32(half.F32ToF16(x))
		}
	}
}

func TestMergeNF4IdentityWithoutLoRA(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	orig, _ := os.ReadFile(model)
	for name, args := range map[string][]string{
		"no lora":    {"merge", "--model", model},
		"strength 0": {"merge", "--model", model, "--lora", kohya + ":0"},
	} {
		out := filepath.Join(t.TempDir(), "out.safetensors")
		rep := filepath.Join(t.TempDir(), "rep.json")
		var so, se bytes.Buffer
		if err := Run(context.Background(), append(args, "--out", out, "--as", "nf4", "--report", rep), &so, &se); err != nil {
			t.Fatalf("%s: %v (%s)", name, err, se.String())
		}
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, orig) {
			t.Errorf("%s: output differs from the input", name)
		}
		var r MergeReport
		b, _ := os.ReadFile(rep)
		if err := json.Unmarshal(b, &r); err != nil || !r.Identity {
			t.Errorf("%s: report %s (%v), want identity", name, b, err)
		}
	}
}

func TestMergeNF4(t *testing.T) {
	for _, nested := range []bool{false, true} {
		model, kohya, peft := mergeFixture(t, nested)
		out := filepath.Join(t.TempDir(), "out.safetensors")
		rep, err := Merge(context.Background(), MergeOptions{Model: model, Out: out, As: "nf4",
			LoRAs: []MergeLoRA{{Path: kohya, Strength: 1}, {Path: peft, Strength: 0.5}}})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Report == nil || rep.Report.Retention <= 0 || len(rep.Report.LoRAs) != 2 {
			t.Fatalf("nested=%v: report %+v", nested, rep.Report)
		}
		base, w := dqWeight(t, model, qkv+".weight")
		delta := qkvDelta(t, kohya, 1, peft, 0.5)
		ref := make([]float32, len(base))
		for i := range ref {
			ref[i] = float32(float64(base[i]) + delta[i])
		}
		want := make([]byte, nf4.PackedLen(len(ref)))
		nf4.Quantize(want, make([]float32, nf4.Blocks(len(ref), w.State.Blocksize)), ref, w.State.Blocksize, nf4.QuantNF4)
		f, err := safetensors.Open(out)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := f.Data(qkv + ".weight")
		var same, off1 int
		for i := range ref {
			g, wv := int(got[i/2]>>(4*(1-i%2))&15), int(want[i/2]>>(4*(1-i%2))&15)
			if g == wv {
				same++
			} else if g-wv == 1 || wv-g == 1 {
				off1++
			}
		}
		if float64(same) < 0.999*float64(len(ref)) || same+off1 != len(ref) {
			t.Errorf("nested=%v: %d of %d codes equal quantize(W_ref), %d off by one", nested, same, len(ref), off1)
		}
		if !strings.Contains(f.Metadata["arenahost.merge.loras"], `"strength":0.5`) {
			t.Errorf("metadata %v does not record the LoRAs and strengths", f.Metadata)
		}
		// Untouched tensors are copied as stored; the output is a valid
		// bitsandbytes checkpoint (nested JSON included).
		src, _ := safetensors.Open(model)
		for _, k := range []string{"img_in.weight", "final_layer.linear.weight", "double_blocks.0.img_attn.qkv.bias"} {
			a, _ := src.Data(k)
			b, err := f.Data(k)
			if err != nil || !bytes.Equal(a, b) {
				t.Errorf("nested=%v: untouched tensor %s changed (%v)", nested, k, err)
			}
		}
		src.Close()
		f.Close()
		if _, err := openMergeInput(out); err != nil {
			t.Errorf("nested=%v: output does not load: %v", nested, err)
		}
		fused, _ := dqWeight(t, out, qkv+".weight")
		var dot, norm float64
		for i := range fused {
			e := float64(fused[i]) - float64(base[i])
			dot += e * delta[i]
			norm += delta[i] * delta[i]
		}
		if dot/norm < 0.2 {
			t.Errorf("nested=%v: retention %.3f of the merged qkv", nested, dot/norm)
		}
	}
}

func TestMergeBF16(t *testing.T) {
	model, kohya, peft := mergeFixture(t, false)
	out := filepath.Join(t.TempDir(), "out.safetensors")
	if _, err := Merge(context.Background(), MergeOptions{Model: model, Out: out, As: "bf16",
		LoRAs: []MergeLoRA{{Path: kohya, Strength: 0.7}, {Path: peft, Strength: 1}}}); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, ti := range f.Tensors {
		if strings.Contains(ti.Name, ".absmax") || strings.Contains(ti.Name, "quant_state") || strings.Contains(ti.Name, "quant_map") {
			t.Fatalf("bf16 output keeps quantization key %s", ti.Name)
		}
	}
	ti, ok := f.Lookup(qkv + ".weight")
	if !ok || ti.DType != safetensors.BF16 || len(ti.Shape) != 2 || ti.Shape[0] != 768 || ti.Shape[1] != 256 {
		t.Fatalf("qkv in bf16 output: %+v", ti)
	}
	base, _ := dqWeight(t, model, qkv+".weight")
	delta := qkvDelta(t, kohya, 0.7, peft, 1)
	got := readAll(t, out)[qkv+".weight"]
	for i := range got {
		ref := float64(base[i]) + delta[i]
		if math.Abs(float64(got[i])-ref) > math.Abs(ref)/128+1e-6 {
			t.Fatalf("qkv[%d] = %v, want bf16(%v)", i, got[i], ref)
		}
	}
}

func TestMergeLoRAConcatenation(t *testing.T) {
	model, kohya, peft := mergeFixture(t, false)
	out := filepath.Join(t.TempDir(), "out.safetensors")
	if _, err := Merge(context.Background(), MergeOptions{Model: model, Out: out, As: "lora",
		LoRAs: []MergeLoRA{{Path: kohya, Strength: 0.6}, {Path: peft, Strength: -1.5}}}); err != nil {
		t.Fatal(err)
	}
	ts := readAll(t, out)
	a, b := ts[qkv+".lora_A.weight"], ts[qkv+".lora_B.weight"]
	if a == nil || b == nil {
		t.Fatalf("output lacks %s.lora_A/lora_B", qkv)
	}
	const outN, in = 768, 256
	r := len(a) / in
	if r != 8+3*4 || len(b) != outN*r {
		t.Fatalf("rank %d (B %d values), want 20", r, len(b))
	}
	delta := qkvDelta(t, kohya, 0.6, peft, -1.5)
	var maxErr, maxD float64
	for i := 0; i < outN; i++ {
		for j := 0; j < in; j++ {
			var acc float64
			for k := 0; k < r; k++ {
				acc += float64(b[i*r+k]) * float64(a[k*in+j])
			}
			maxErr = math.Max(maxErr, math.Abs(acc-delta[i*in+j]))
			maxD = math.Max(maxD, math.Abs(delta[i*in+j]))
		}
	}
	if maxErr > 1e-5*maxD {
		t.Errorf("B_out·A_out off the weighted sum by %.3g (max |ΔW| %.3g)", maxErr, maxD)
	}
	f, _ := safetensors.Open(out)
	defer f.Close()
	if !strings.Contains(f.Metadata["arenahost.merge.loras"], `"strength":-1.5`) {
		t.Errorf("metadata %v", f.Metadata)
	}
}

func TestMergeErrors(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	bad := filepath.Join(t.TempDir(), "trunc.safetensors")
	b, _ := os.ReadFile(kohya)
	_ = os.WriteFile(bad, b[:100], 0o644)
	out := filepath.Join(t.TempDir(), "out.safetensors")
	for name, o := range map[string]MergeOptions{
		"bad as":    {Model: model, Out: out, As: "gguf"},
		"truncated": {Model: model, Out: out, As: "nf4", LoRAs: []MergeLoRA{{Path: bad, Strength: 1}}},
		"no model":  {Model: model + ".missing", Out: out, As: "bf16"},
	} {
		if _, err := Merge(context.Background(), o); err == nil {
			t.Errorf("%s: merge succeeded", name)
		}
		if _, err := os.Stat(out); err == nil {
			t.Fatalf("%s: output written despite the error", name)
		}
	}
}
