package lora

import (
	"math"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Against diffusers' own loader: a PEFT LoRA saved by FluxPipeline and
// loaded by diffusers' load_lora_adapter into a small FluxTransformer2DModel
// (testdata/peft_flux_lora.py) gives the layer outputs that side mode gives
// on the same weights, in diffusers layout, and row for row on the same
// model renamed to BFL layout (fused qkv and linear1).
func TestAgainstDiffusersLoader(t *testing.T) {
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, py, filepath.Join("testdata", "peft_flux_lora.py"), dir)
	or, err := safetensors.Open(filepath.Join(dir, "oracle.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer or.Close()
	f32 := func(name string) []float32 {
		b, err := or.Data(name)
		if err != nil {
			t.Fatal(err)
		}
		out := make([]float32, len(b)/4)
		half.DecodeF32(out, b)
		return out
	}
	var layers []Layer
	var names []string
	for _, ti := range or.Tensors {
		if n, ok := strings.CutSuffix(ti.Name, ".weight"); ok {
			layers = append(layers, Layer{Name: n, Out: int(ti.Shape[0]), In: int(ti.Shape[1])})
			names = append(names, ti.Name)
		}
	}
	sort.Slice(layers, func(i, j int) bool { return layers[i].Name < layers[j].Name })
	info, err := layout.DetectInfo(names)
	if err != nil || info.Layout != layout.FluxDiffusers {
		t.Fatalf("oracle model layout %v, %v", info, err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Parse(filepath.Join(dir, "lora.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if f.Format != FormatDiffusers || len(f.Modules) == 0 || f.Modules[0].Scale != 2 {
		t.Fatalf("format %s, %d modules, scale %v; want diffusers, scale lora_alpha/r = 2", f.Format, len(f.Modules), f.Modules[0].Scale)
	}
	mp, err := m.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(mp.Unmatched) != 0 || len(mp.Targets) != len(f.Modules) {
		t.Fatalf("unmatched %v", mp.Unmatched)
	}
	p, err := BuildSide(m, []*Mapping{mp}, []float64{1}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// side output of rows [r0, r0+n) of layer sl for input x (3 rows).
	sideRows := func(sl *SideLayer, w, bias, x []float32, r0, n int) [][]float64 {
		out := make([][]float64, 3)
		for s := range out {
			xs := x[s*sl.In : (s+1)*sl.In]
			xa := make([]float64, sl.Rank)
			for k := range xa {
				for j, v := range xs {
					xa[k] += float64(v) * float64(sl.A[k*sl.In+j])
				}
			}
			out[s] = make([]float64, n)
			for i := 0; i < n; i++ {
				r := r0 + i
				acc := float64(bias[r])
				for j, v := range xs {
					acc += float64(v) * float64(w[r*sl.In+j])
				}
				for k, v := range xa {
					acc += v * float64(sl.B[r*sl.Rank+k])
				}
				out[s][i] = acc
			}
		}
		return out
	}
	compare := func(what string, got [][]float64, y []float32, out, r0 int) {
		t.Helper()
		var maxErr, maxY float64
		for s := range got {
			for i, g := range got[s] {
				want := float64(y[s*out+r0+i])
				maxErr = math.Max(maxErr, math.Abs(g-want))
				maxY = math.Max(maxY, math.Abs(want))
			}
		}
		if maxErr > 1e-4*math.Max(1, maxY) {
			t.Errorf("%s: max |y − y_diffusers| = %.3g (|y| ≤ %.3g)", what, maxErr, maxY)
		}
	}
	checked := 0
	for _, l := range layers {
		sl := p.Layer(l.Name)
		if sl == nil {
			continue
		}
		compare(l.Name, sideRows(sl, f32(l.Name+".weight"), f32(l.Name+".bias"), f32(l.Name+".x"), 0, l.Out), f32(l.Name+".y"), l.Out, 0)
		checked++
	}
	if checked != len(f.Modules) {
		t.Errorf("checked %d layers, LoRA has %d modules", checked, len(f.Modules))
	}

	// The same LoRA on the same model in BFL layout: build the fused
	// weights from the diffusers ones by the row maps, then compare each
	// part's rows with diffusers' output for that part.
	shapes := map[string][]int{}
	for _, l := range layers {
		shapes[l.Name+".weight"] = []int{l.Out, l.In}
	}
	cfg, err := layout.FluxConfigFromShapes(layout.FluxDiffusers, shapes)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HeadDim == 0 { // no norm scales among the Linears; the head count does not affect the table
		cfg.HeadDim = cfg.Hidden
	}
	bl, _ := cfg.Linears(layout.FluxBFL)
	rowMaps, _ := cfg.RowMaps()
	var bLayers []Layer
	var bNames []string
	for _, l := range bl {
		bLayers = append(bLayers, Layer{Name: "model.diffusion_model." + l.Name, Out: l.Out, In: l.In})
		bNames = append(bNames, "model.diffusion_model."+l.Name+".weight")
	}
	bInfo, err := layout.DetectInfo(bNames)
	if err != nil {
		t.Fatal(err)
	}
	bm, err := NewModel(bInfo, bLayers)
	if err != nil {
		t.Fatal(err)
	}
	bmp, err := bm.Map(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(bmp.Unmatched) != 0 {
		t.Fatalf("BFL: unmatched %v", bmp.Unmatched)
	}
	bp, err := BuildSide(bm, []*Mapping{bmp}, []float64{1}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	parts := 0
	for _, r := range rowMaps {
		sl := bp.Layer("model.diffusion_model." + r.BFL)
		if sl == nil || p.Layer(r.Diffusers) == nil {
			continue
		}
		// Fused weight and bias rows from the diffusers layer's.
		w := make([]float32, sl.Out*sl.In)
		bias := make([]float32, sl.Out)
		dw, db := f32(r.Diffusers+".weight"), f32(r.Diffusers+".bias")
		copy(w[r.BFLRow*sl.In:(r.BFLRow+r.Rows)*sl.In], dw[r.DiffRow*sl.In:(r.DiffRow+r.Rows)*sl.In])
		copy(bias[r.BFLRow:r.BFLRow+r.Rows], db[r.DiffRow:r.DiffRow+r.Rows])
		dl, _ := m.Layer(r.Diffusers)
		compare("bfl "+r.BFL+" ← "+r.Diffusers, sideRows(sl, w, bias, f32(r.Diffusers+".x"), r.BFLRow, r.Rows), f32(r.Diffusers+".y"), dl.Out, r.DiffRow)
		parts++
	}
	if parts < len(f.Modules) {
		t.Errorf("BFL: compared %d parts, LoRA has %d modules", parts, len(f.Modules))
	}
}
