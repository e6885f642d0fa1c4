package lora

import (
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// tt is one tensor of a hand-built LoRA file.
type tt struct {
	name  string
	shape []int64
	data  []float32
}

// writeLoRA writes a LoRA file with real safetensors bytes. dtype F32, F16
// or BF16; values are stored as given (callers round them first for 16-bit).
func writeLoRA(t *testing.T, file string, meta map[string]string, dtype safetensors.DType, ts ...tt) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), file)
	var ws []safetensors.WriteTensor
	for _, x := range ts {
		var b []byte
		switch dtype {
		case safetensors.F32:
			b = make([]byte, 4*len(x.data))
			half.EncodeF32(b, x.data)
		case safetensors.BF16:
			b = make([]byte, 2*len(x.data))
			half.EncodeBF16(b, x.data)
		case safetensors.F16:
			b = make([]byte, 2*len(x.data))
			half.EncodeF16(b, x.data)
		}
		ws = append(ws, safetensors.WriteTensor{Name: x.name, DType: dtype, Shape: x.shape, Data: b})
	}
	if err := safetensors.WriteFile(path, meta, ws); err != nil {
		t.Fatal(err)
	}
	return path
}

func randMat(r *rand.Rand, rows, cols int) []float32 {
	d := make([]float32, rows*cols)
	for i := range d {
		d[i] = float32(r.NormFloat64() * 0.1)
	}
	return d
}

// lora returns down/up/alpha tensors for a module key with the given
// suffix style ("kohya": lora_down/lora_up, "peft": lora_A/lora_B).
func loraPair(r *rand.Rand, key, style string, rank, out, in int, alpha float32) ([]tt, Mat, Mat) {
	down, up := randMat(r, rank, in), randMat(r, out, rank)
	dn, un := ".lora_down.weight", ".lora_up.weight"
	if style == "peft" {
		dn, un = ".lora_A.weight", ".lora_B.weight"
	}
	if style == "xlabs" {
		dn, un = ".down.weight", ".up.weight"
	}
	ts := []tt{{key + dn, []int64{int64(rank), int64(in)}, down}, {key + un, []int64{int64(out), int64(rank)}, up}}
	if alpha != 0 {
		ts = append(ts, tt{key + ".alpha", nil, []float32{alpha}})
	}
	return ts, Mat{Rows: out, Cols: rank, Data: up}, Mat{Rows: rank, Cols: in, Data: down}
}

// sampleModel returns the sample Flux model's layers in a layout, with a
// prefix, and random base weights.
func sampleModel(t *testing.T, l layout.Layout, prefix string) (*Model, *lazyW) {
	t.Helper()
	lin, err := layout.FluxSample().Linears(l)
	if err != nil {
		t.Fatal(err)
	}
	var layers []Layer
	w := &lazyW{shapes: map[string][2]int{}, got: map[string][]float32{}}
	var names []string
	for _, li := range lin {
		layers = append(layers, Layer{Name: prefix + li.Name, Out: li.Out, In: li.In})
		w.shapes[prefix+li.Name] = [2]int{li.Out, li.In}
		names = append(names, prefix+li.Name+".weight")
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	return m, w
}

// lazyW makes a layer's random base weights on first use (seeded by
// name), so tests pay only for the layers they touch.
type lazyW struct {
	shapes map[string][2]int
	got    map[string][]float32
}

func (w *lazyW) get(name string) []float32 {
	if x, ok := w.got[name]; ok {
		return x
	}
	sh, ok := w.shapes[name]
	if !ok {
		panic("no layer " + name)
	}
	var seed uint64
	for _, c := range name {
		seed = seed*131 + uint64(c)
	}
	x := randMat(rand.New(rand.NewPCG(seed, 7)), sh[0], sh[1])
	w.got[name] = x
	return x
}

// addRows adds s·B[srcRow:srcRow+rows]·A into e (float64, [out × in]) at dstRow.
func addRows(e []float64, in int, dstRow int, s float64, b, a Mat, srcRow, rows int) {
	for i := 0; i < rows; i++ {
		for k := 0; k < a.Rows; k++ {
			bv := s * float64(b.Data[(srcRow+i)*b.Cols+k])
			for j := 0; j < in; j++ {
				e[(dstRow+i)*in+j] += bv * float64(a.Data[k*in+j])
			}
		}
	}
}

// checkSide compares y = x·Wᵀ + (x·Aᵀ)·Bᵀ + x·Denseᵀ from the plan with
// y_ref = x·(W + E)ᵀ computed in float64, for every layer of the model.
func checkSide(t *testing.T, p *Plan, w *lazyW, expect map[string][]float64) {
	t.Helper()
	r := rand.New(rand.NewPCG(3, 4))
	for _, name := range p.Model.Layers() {
		l, _ := p.Model.Layer(name)
		e := expect[name]
		sl := p.Layer(name)
		if (sl != nil) != (e != nil) {
			t.Fatalf("layer %s: plan touches it %v, oracle %v", name, sl != nil, e != nil)
		}
		if sl == nil {
			continue
		}
		wn := w.get(name)
		x := make([]float64, l.In)
		for j := range x {
			x[j] = r.NormFloat64()
		}
		var maxErr, maxRef float64
		xa := make([]float64, sl.Rank)
		for k := 0; k < sl.Rank; k++ {
			for j := 0; j < l.In; j++ {
				xa[k] += x[j] * float64(float32(sl.A[k*l.In+j]))
			}
		}
		for i := 0; i < l.Out; i++ {
			var got, want, dref float64
			for j := 0; j < l.In; j++ {
				wij := float64(wn[i*l.In+j])
				got += x[j] * wij
				want += x[j] * (wij + e[i*l.In+j])
				dref += x[j] * e[i*l.In+j]
				if sl.Dense != nil {
					got += x[j] * float64(sl.Dense[i*l.In+j])
				}
			}
			for k := 0; k < sl.Rank; k++ {
				got += xa[k] * float64(sl.B[i*sl.Rank+k])
			}
			maxErr = math.Max(maxErr, math.Abs(got-want))
			maxRef = math.Max(maxRef, math.Abs(dref))
		}
		if maxRef == 0 {
			t.Fatalf("layer %s: oracle delta is zero", name)
		}
		if maxErr > 1e-4*math.Max(1, maxRef) {
			t.Errorf("layer %s: side y off by %.3g (delta magnitude %.3g)", name, maxErr, maxRef)
		}
	}
}
