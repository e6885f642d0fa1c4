package safetensors

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

// compatCase is one tensor set written by both Go and Python.
type compatCase struct {
	name     string
	api      string // "numpy" (safetensors.numpy.save_file) or "spec" (raw TensorSpec)
	metadata map[string]string
	tensors  []WriteTensor
}

// fill returns n pseudo-random bytes for dtype d (0/1 for BOOL).
func fill(r *rand.Rand, d DType, shape []int64) []byte {
	n := TensorInfo{DType: d, Shape: shape}.NBytes()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
		if d == BOOL {
			b[i] &= 1
		}
	}
	return b
}

func compatCases() []compatCase {
	r := rand.New(rand.NewPCG(1, 2))
	wt := func(name string, d DType, shape ...int64) WriteTensor {
		return WriteTensor{Name: name, DType: d, Shape: shape, Data: fill(r, d, shape)}
	}
	return []compatCase{
		{name: "numpy dtypes mixed", api: "numpy", tensors: []WriteTensor{
			wt("z.u8", U8, 3), wt("a.f32", F32, 2, 3), wt("m.f64", F64, 5), wt("b.f32", F32, 7),
			wt("f16", F16, 3, 1), wt("i64", I64, 2), wt("i32", I32, 3), wt("i16", I16, 5),
			wt("i8", I8, 9), wt("u64", U64, 1), wt("u32", U32, 2), wt("u16", U16, 4), wt("bool", BOOL, 6),
			wt("A.f32", F32, 1),
		}},
		{name: "one metadata key", api: "numpy", metadata: map[string]string{"format": "pt"},
			tensors: []WriteTensor{wt("w", F32, 4, 4), wt("b", F16, 4)}},
		{name: "empty metadata", api: "numpy", metadata: map[string]string{},
			tensors: []WriteTensor{wt("w", U8, 5)}},
		{name: "many metadata keys", api: "numpy",
			metadata: map[string]string{"format": "np", "z": "last", "a": "é \"q\" \\ \n\t\x01", "ß☃": ""},
			tensors:  []WriteTensor{wt("x", I32, 2, 2)}},
		{name: "empty tensors", api: "numpy", tensors: []WriteTensor{
			wt("e0", F32, 0), wt("e1", F64, 0, 3), wt("e2", U8, 3, 0, 2), wt("full", F32, 3), wt("e3", BOOL, 0),
		}},
		{name: "0-d tensors", api: "numpy", tensors: []WriteTensor{
			wt("s.f16", F16), wt("s.f64", F64), wt("s.u8", U8), wt("v", F16, 2),
		}},
		{name: "no tensors", api: "numpy"},
		{name: "no tensors with metadata", api: "numpy", metadata: map[string]string{"k": "v"}},
		{name: "names needing escapes", api: "numpy", tensors: []WriteTensor{
			wt(`quote"d`, U8, 1), wt(`back\slash`, U8, 2), wt("tab\tnl\ncr\r", U8, 1), wt("ctl\x01\x1f\x7f", U8, 1),
			wt("ünïcödé ☃ 😀", U8, 1), wt("html</script>&", U8, 1), wt("", U8, 1), wt("bs\b ff\f", U8, 1),
		}},
		{name: "non-numpy dtypes", api: "spec", metadata: map[string]string{"format": "pt"}, tensors: []WriteTensor{
			wt("bf16", BF16, 3, 2), wt("e4m3", F8E4M3, 5), wt("e5m2", F8E5M2, 4), wt("e8m0", F8E8M0, 2),
			wt("e4m3fnuz", F8E4M3FNUZ, 3), wt("e5m2fnuz", F8E5M2FNUZ, 1), wt("c64", C64, 2), wt("f16", F16, 2),
			wt("bf16.empty", BF16, 0), wt("bf16.scalar", BF16),
		}},
	}
}

type pyTensor struct {
	DType  string  `json:"dtype"`
	Shape  []int64 `json:"shape"`
	SHA256 string  `json:"sha256"`
}

type pyRead struct {
	Metadata map[string]string   `json:"metadata"`
	Tensors  map[string]pyTensor `json:"tensors"`
	Error    string              `json:"error"`
}

// runPy runs testdata/pyst.py on a list of jobs and decodes one result per job.
func runPy(t *testing.T, jobs []map[string]any, results any) {
	t.Helper()
	py := testenv.Python(t)
	jobFile := filepath.Join(t.TempDir(), "jobs.json")
	b, err := json.Marshal(jobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(jobFile, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out := testenv.RunPython(t, py, filepath.Join("testdata", "pyst.py"), jobFile)
	if err := json.Unmarshal(out, results); err != nil {
		t.Fatalf("decode pyst.py output: %v\n%s", err, out)
	}
}

// TestWriterMatchesPython writes each case with Go and with Python's
// safetensors 0.8.0 and compares the files byte for byte. Python writes
// metadata in random hash order, so with several metadata keys the files
// are compared after putting Python's metadata in sorted order.
func TestWriterMatchesPython(t *testing.T) {
	dir := t.TempDir()
	cases := compatCases()
	var jobs []map[string]any
	for i, c := range cases {
		var specTensors []map[string]any
		for _, w := range c.tensors {
			specTensors = append(specTensors, map[string]any{
				"name": w.Name, "dtype": w.DType, "shape": append([]int64{}, w.Shape...), "data": hex.EncodeToString(w.Data),
			})
		}
		if specTensors == nil {
			specTensors = []map[string]any{}
		}
		var meta any
		if c.metadata != nil {
			meta = c.metadata
		}
		jobs = append(jobs, map[string]any{
			"op":   "write",
			"spec": map[string]any{"api": c.api, "metadata": meta, "tensors": specTensors},
			"out":  filepath.Join(dir, "py", caseFile(i)),
		})
	}
	if err := os.MkdirAll(filepath.Join(dir, "py"), 0o755); err != nil {
		t.Fatal(err)
	}
	var ignored []any
	runPy(t, jobs, &ignored)

	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			goPath := filepath.Join(dir, "go-"+caseFile(i))
			if err := WriteFile(goPath, c.metadata, c.tensors); err != nil {
				t.Fatal(err)
			}
			goBytes := mustRead(t, goPath)
			pyBytes := mustRead(t, filepath.Join(dir, "py", caseFile(i)))
			if len(c.metadata) > 1 {
				pyBytes = canonical(t, pyBytes)
			}
			if !bytes.Equal(goBytes, pyBytes) {
				t.Errorf("Go and Python files differ\n go header: %q\n py header: %q", headerOf(goBytes), headerOf(pyBytes))
			}
		})
	}
}

// TestPythonReadsGoFiles checks that Python's reader accepts every Go-written
// file and sees the same names, dtypes, shapes, bytes and metadata.
func TestPythonReadsGoFiles(t *testing.T) {
	dir := t.TempDir()
	cases := compatCases()
	var jobs []map[string]any
	for i, c := range cases {
		p := filepath.Join(dir, caseFile(i))
		if err := WriteFile(p, c.metadata, c.tensors); err != nil {
			t.Fatal(err)
		}
		jobs = append(jobs, map[string]any{"op": "read", "path": p})
	}
	var got []pyRead
	runPy(t, jobs, &got)
	if len(got) != len(cases) {
		t.Fatalf("pyst.py returned %d results for %d jobs", len(got), len(cases))
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := got[i]
			if r.Error != "" {
				t.Fatalf("Python rejected the Go file: %s", r.Error)
			}
			want := map[string]pyTensor{}
			for _, w := range c.tensors {
				sum := sha256.Sum256(w.Data)
				shape := append([]int64{}, w.Shape...)
				want[w.Name] = pyTensor{DType: string(w.DType), Shape: shape, SHA256: hex.EncodeToString(sum[:])}
			}
			if len(want) == 0 && len(r.Tensors) == 0 {
				r.Tensors = want
			}
			if !reflect.DeepEqual(r.Tensors, want) {
				t.Errorf("tensors: Python read %v, want %v", r.Tensors, want)
			}
			if len(c.metadata) > 0 && !reflect.DeepEqual(r.Metadata, c.metadata) {
				t.Errorf("metadata: Python read %v, want %v", r.Metadata, c.metadata)
			}
		})
	}
}

func caseFile(i int) string { return "case" + string(rune('a'+i)) + ".safetensors" }

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func headerOf(b []byte) string {
	if len(b) < 8 {
		return string(b)
	}
	n := int(b[0]) | int(b[1])<<8 | int(b[2])<<16
	if 8+n > len(b) {
		return string(b[8:])
	}
	return string(b[8 : 8+n])
}

// canonical re-encodes a file's header with this package (sorted metadata)
// after checking it parses, keeping its data section.
func canonical(t *testing.T, file []byte) []byte {
	t.Helper()
	h, err := ParseHeader("python file", bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	prefix, layout, err := EncodeHeader(h.Metadata, h.Tensors)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(layout, h.Tensors) {
		t.Fatalf("Python's data layout differs from the Go writer's:\n py %v\n go %v", h.Tensors, layout)
	}
	return append(prefix, file[h.DataStart:]...)
}
