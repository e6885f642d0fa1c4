package nf4

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

func TestParseQuantState(t *testing.T) {
	nested := `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3072, 3072], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.012299999594688416}`
	plain := `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3072, 3072]}`
	q, err := ParseQuantState([]byte(nested))
	if err != nil {
		t.Fatal(err)
	}
	want := QuantState{QuantType: QuantNF4, Blocksize: 64, DType: BFloat16, Shape: []int64{3072, 3072},
		Nested: true, NestedBlocksize: 256, NestedDType: Float32, NestedOffset: 0.012299999594688416}
	if !reflect.DeepEqual(q, want) {
		t.Fatalf("parsed %+v, want %+v", q, want)
	}
	if got := q.MarshalPython(); string(got) != nested || len(got) != 173 {
		t.Errorf("MarshalPython = %s (%d bytes)", got, len(got))
	}
	q, err = ParseQuantState([]byte(plain))
	if err != nil || q.Nested || string(q.MarshalPython()) != plain || len(plain) != 82 {
		t.Errorf("plain: %+v %v %s", q, err, q.MarshalPython())
	}

	bad := []struct{ name, in, want string }{
		{"empty", ``, "EOF"},
		{"not object", `[1]`, "want a JSON object"},
		{"bad json", `{"quant_type": }`, "invalid character"},
		{"trailing", plain + ` {}`, "trailing data"},
		{"unknown key", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "extra": 1}`, `unknown field "extra"`},
		{"duplicate", `{"quant_type": "nf4", "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4]}`, `duplicate key "quant_type"`},
		{"missing shape", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"}`, `missing field "shape"`},
		{"bad type", `{"quant_type": "int4", "blocksize": 64, "dtype": "bfloat16", "shape": [4]}`, "quant_type"},
		{"bad blocksize", `{"quant_type": "nf4", "blocksize": 48, "dtype": "bfloat16", "shape": [4]}`, "blocksize: 48"},
		{"float blocksize", `{"quant_type": "nf4", "blocksize": 64.0, "dtype": "bfloat16", "shape": [4]}`, "blocksize: want an integer"},
		{"huge blocksize", `{"quant_type": "nf4", "blocksize": 8192, "dtype": "bfloat16", "shape": [4]}`, "blocksize: 8192"},
		{"bad dtype", `{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [4]}`, "dtype"},
		{"null shape", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": null}`, "shape: want a list"},
		{"negative dim", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, -1]}`, "dimension 1: -1 is negative"},
		{"overflow", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4294967296, 4294967296]}`, "overflows"},
		{"partial nested", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "nested_blocksize": 256}`, "must appear together"},
		{"nested dtype", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "nested_blocksize": 256, "nested_dtype": "float16", "nested_offset": 0.5}`, "nested_dtype"},
		{"offset string", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "x"}`, "nested_offset"},
		{"offset NaN", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": NaN}`, "invalid character"},
		{"offset huge", `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1e999}`, "not a finite number"},
		{"too big", `{"quant_type": "` + strings.Repeat("x", MaxStateJSON) + `"}`, "limit"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseQuantState([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestPythonFloatCases(t *testing.T) {
	for _, tc := range []struct {
		f    float64
		want string
	}{
		{0, "0.0"}, {math.Copysign(0, -1), "-0.0"}, {1, "1.0"}, {-2.5, "-2.5"}, {0.0001, "0.0001"},
		{0.00001, "1e-05"}, {1.5e-5, "1.5e-05"}, {1e16, "1e+16"}, {1234567890123456, "1234567890123456.0"},
		{0.012299999594688416, "0.012299999594688416"}, {math.Inf(1), "Infinity"}, {math.NaN(), "NaN"},
		{1.7976931348623157e308, "1.7976931348623157e+308"}, {5e-324, "5e-324"}, {123.456, "123.456"},
	} {
		if g := PythonFloat(tc.f); g != tc.want {
			t.Errorf("PythonFloat(%v) = %q, want %q", tc.f, g, tc.want)
		}
	}
}

// TestPythonFloatAgainstPython compares PythonFloat with json.dumps on
// float32-valued doubles (what nested_offset holds) and random doubles.
func TestPythonFloatAgainstPython(t *testing.T) {
	py := testenv.Python(t)
	r := rand.New(rand.NewPCG(11, 12))
	var vals []float64
	for range 3000 {
		vals = append(vals, float64(math.Float32frombits(r.Uint32())))
		vals = append(vals, math.Float64frombits(r.Uint64()))
		vals = append(vals, float64(r.Float32()*0.1))
	}
	for e := -330; e <= 310; e++ {
		vals = append(vals, math.Pow(10, float64(e)), 1.5*math.Pow(10, float64(e)))
	}
	var in bytes.Buffer
	for _, v := range vals {
		fmt.Fprintf(&in, "%016x\n", math.Float64bits(v))
	}
	cmd := exec.Command(py, "testdata/py_float_repr.py")
	cmd.Stdin = &in
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", py, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(vals) {
		t.Fatalf("%d lines for %d values", len(lines), len(vals))
	}
	bad := 0
	for i, v := range vals {
		if g := PythonFloat(v); g != lines[i] {
			if bad < 5 {
				t.Errorf("PythonFloat(%016x) = %q, Python %q", math.Float64bits(v), g, lines[i])
			}
			bad++
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d values differ from Python", bad, len(vals))
	}
}

// FuzzParseQuantState: the parser never panics, and whatever it accepts
// marshals to JSON that parses back to the same state and marshals to the
// same bytes.
func FuzzParseQuantState(f *testing.F) {
	f.Add([]byte(`{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3072, 3072]}`))
	f.Add([]byte(`{"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [7, 33], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1e-05}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		q, err := ParseQuantState(data)
		if err != nil {
			return
		}
		m := q.MarshalPython()
		q2, err := ParseQuantState(m)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", m, err)
		}
		if !reflect.DeepEqual(q, q2) {
			t.Fatalf("round trip %+v -> %+v", q, q2)
		}
		if m2 := q2.MarshalPython(); !bytes.Equal(m, m2) {
			t.Fatalf("marshal not stable: %s vs %s", m, m2)
		}
	})
}

// TestTorchDynamicMap pins DynamicMap to torch's fused-multiply-add
// evaluation of bitsandbytes' create_dynamic_map, and the unfused variant
// to the entries torch's DEFAULT kernels store.
func TestTorchDynamicMap(t *testing.T) {
	if TorchDynamicMap(true) != DynamicMap() {
		t.Fatal("TorchDynamicMap(true) differs from DynamicMap()")
	}
	plain := TorchDynamicMap(false)
	diff := 0
	for i, v := range DynamicMap() {
		if d := int64(math.Float32bits(plain[i])) - int64(math.Float32bits(v)); d != 0 {
			diff++
			if d < -2 || d > 2 {
				t.Errorf("entry %d: unfused %v, fused %v: more than two ulps apart", i, plain[i], v)
			}
		}
	}
	// Observed with ATEN_CPU_CAPABILITY=default (torch 2.15): entries 18, 20
	// and 23 among the 42 that differ.
	for i, want := range map[int]uint32{18: 0xbf3d6667, 20: 0xbf363333, 23: 0xbf2b6667} {
		if got := math.Float32bits(plain[i]); got != want {
			t.Errorf("unfused entry %d = %#08x, torch DEFAULT stores %#08x", i, got, want)
		}
	}
	if diff != 42 {
		t.Errorf("%d entries differ between the variants, want 42", diff)
	}
}
