// Package teoracle is the tests' torch oracle for a fused text-encoder LoRA
// on a bundled file's plain encoder weights: torch's
// (w.float() + delta).to(w.dtype) per weight (te_fuse_oracle.py), checked
// first against the same formula in Go on the oracle's own delta, then
// compared with what arenahost wrote.
package teoracle

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/half"
)

// Weight is the oracle for one encoder weight.
type Weight struct {
	DType  string    // safetensors dtype: F16, BF16, F32, F8_E4M3, F8_E5M2
	Delta  []float32 // torch's fp32 delta (rounded from fp64)
	Merged []byte    // torch's (w.float() + delta).to(dtype), stored bytes
}

var torchDType = map[string]string{"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}

// Codec widens and rounds dtype's stored bytes as torch does (shared/half).
func Codec(dtype string) (size int, dec func([]float32, []byte) int, enc func([]byte, []float32) int) {
	switch dtype {
	case "F16":
		return 2, half.DecodeF16, half.EncodeF16
	case "BF16":
		return 2, half.DecodeBF16, half.EncodeBF16
	case "F32":
		return 4, half.DecodeF32, half.EncodeF32
	case "F8_E4M3":
		return 1, half.DecodeF8E4M3, half.EncodeF8E4M3
	case "F8_E5M2":
		return 1, half.DecodeF8E5M2, half.EncodeF8E5M2
	}
	return 0, nil, nil
}

// Run runs the oracle on bundle with the kohya LoRA at strength and checks
// it against the formula (the oracle rule): for every weight, its merged
// bytes must equal Go's round(decode(w) + delta) on torch's delta, bit for
// bit. orig returns a weight's stored bytes as the bundle holds them.
func Run(t *testing.T, bundle, lora string, strength float64, orig func(key string) []byte) map[string]Weight {
	t.Helper()
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, py, filepath.Join(testenv.RepoRoot(t), "internal", "teoracle", "te_fuse_oracle.py"), bundle, lora, strconv.FormatFloat(strength, 'g', -1, 64), dir)
	raw, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var man map[string]string
	if err := json.Unmarshal(raw, &man); err != nil {
		t.Fatal(err)
	}
	out := map[string]Weight{}
	for key, tdt := range man {
		dt, ok := torchDType[tdt]
		if !ok {
			t.Fatalf("oracle: %s: dtype %s", key, tdt)
		}
		db, err := os.ReadFile(filepath.Join(dir, key+".delta"))
		if err != nil {
			t.Fatal(err)
		}
		mb, err := os.ReadFile(filepath.Join(dir, key+".merged"))
		if err != nil {
			t.Fatal(err)
		}
		w := Weight{DType: dt, Delta: make([]float32, len(db)/4), Merged: mb}
		half.DecodeF32(w.Delta, db)
		size, dec, enc := Codec(dt)
		o := orig(key)
		if len(o) != len(w.Delta)*size || len(mb) != len(o) {
			t.Fatalf("oracle: %s: %d stored bytes, %d delta values, %d merged bytes", key, len(o), len(w.Delta), len(mb))
		}
		v := make([]float32, len(w.Delta))
		dec(v, o)
		for i := range v {
			v[i] += w.Delta[i]
		}
		formula := make([]byte, len(o))
		enc(formula, v)
		if string(formula) != string(mb) {
			t.Fatalf("oracle: %s: torch's (w.float() + delta).to(%s) differs from the same formula in Go on its delta: the oracle or shared/half is wrong", key, tdt)
		}
		out[key] = w
	}
	return out
}

// Compare returns how many of got's values equal the oracle's merged ones
// and an error if any other differs by more than one step of the dtype (a
// delta summed in another order than torch's, one fp32 ulp off, can round
// the other way: see Enough for the share that must be identical).
func Compare(key string, w Weight, got []byte) (same, n int, err error) {
	size, dec, _ := Codec(w.DType)
	if len(got) != len(w.Merged) {
		return 0, 0, fmt.Errorf("%s: %d bytes, oracle %d", key, len(got), len(w.Merged))
	}
	n = len(got) / size
	a, b := make([]float32, n), make([]float32, n)
	dec(a, got)
	dec(b, w.Merged)
	for i := 0; i < n; i++ {
		if string(got[i*size:(i+1)*size]) == string(w.Merged[i*size:(i+1)*size]) {
			same++
			continue
		}
		// Adjacent representable values: their stored patterns differ by one
		// (same sign).
		p, q := pattern(got[i*size:(i+1)*size]), pattern(w.Merged[i*size:(i+1)*size])
		if p-q != 1 && q-p != 1 {
			return same, n, fmt.Errorf("%s[%d]: %v, oracle %v: more than one step of %s apart", key, i, a[i], b[i], w.DType)
		}
	}
	return same, n, nil
}

// Enough fails the test unless at least 99.9 % of the values compared
// (summed over Compare's results) are identical to the oracle's.
func Enough(t *testing.T, what string, same, n int) {
	t.Helper()
	if n == 0 || float64(same) < 0.999*float64(n) {
		t.Errorf("%s: %d of %d values identical to torch's (w.float() + delta).to(dtype), want ≥ 99.9 %%", what, same, n)
	}
	t.Logf("%s: %d of %d values identical to torch's (w.float() + delta).to(dtype), the rest one step of the dtype away", what, same, n)
}

func pattern(b []byte) int64 {
	var v int64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | int64(b[i])
	}
	return v
}
