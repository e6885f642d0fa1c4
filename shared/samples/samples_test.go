package samples

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// A random-codes model has the quantized sample's tensors, names, dtypes
// and shapes, and valid 4-bit weights: codes spread over all 16 values,
// absmax in [0.005, 0.05).
func TestWriteModel(t *testing.T) {
	dir := t.TempDir()
	header := func(path string) (*safetensors.File, map[string]nf4.TensorMeta) {
		t.Helper()
		f, err := safetensors.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		meta := map[string]nf4.TensorMeta{}
		for _, ti := range f.Tensors {
			meta[ti.Name] = nf4.TensorMeta{DType: string(ti.DType), Shape: ti.Shape}
		}
		return f, meta
	}
	for _, tc := range []struct {
		name string
		o    ModelOptions
	}{
		{"quantized", ModelOptions{Seed: 1}},
		{"random codes", ModelOptions{Seed: 1, RandomCodes: true}},
		{"random codes blocksize 128 float16", ModelOptions{Seed: 2, RandomCodes: true, Blocksize: 128, DType: "float16"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".safetensors")
			if err := WriteModel(path, tc.o); err != nil {
				t.Fatal(err)
			}
			f, meta := header(path)
			ws, plain, err := nf4.GroupWeights(path, meta, f.Data)
			if err != nil {
				t.Fatal(err)
			}
			if len(ws) != 42 || len(plain) == 0 {
				t.Fatalf("%d 4-bit weights and %d plain tensors, want the sample's 42 and its norms and biases", len(ws), len(plain))
			}
			var counts [16]int
			for _, w := range ws {
				if err := w.Validate(meta, f.Data); err != nil {
					t.Fatal(err)
				}
				d, err := w.Load(f.Data)
				if err != nil {
					t.Fatal(err)
				}
				am, err := nf4.Absmax(w.State, d)
				if err != nil {
					t.Fatal(err)
				}
				if tc.o.RandomCodes && (slices.Min(am) < 0.005 || slices.Max(am) >= 0.05) {
					t.Fatalf("%s: absmax in [%v, %v]", w.Name, slices.Min(am), slices.Max(am))
				}
				for _, b := range d.Packed {
					counts[b>>4]++
					counts[b&15]++
				}
			}
			for c, n := range counts {
				if n == 0 {
					t.Errorf("code %d never stored", c)
				}
			}
		})
	}
	// Same tensors, dtypes and shapes either way.
	_, q := header(filepath.Join(dir, "quantized.safetensors"))
	_, r := header(filepath.Join(dir, "random codes.safetensors"))
	if len(q) != len(r) {
		t.Fatalf("%d tensors quantized, %d with random codes", len(q), len(r))
	}
	for k, m := range q {
		if rm, ok := r[k]; !ok || rm.DType != m.DType || !slices.Equal(rm.Shape, m.Shape) {
			t.Errorf("tensor %s: %v quantized, %v with random codes", k, m, rm)
		}
	}
}
