package safetensors

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestOpenDataClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	tensors := []WriteTensor{
		{Name: "w", DType: F32, Shape: []int64{2, 2}, Data: []byte("0123456789abcdef")},
		{Name: "b", DType: U8, Shape: []int64{3}, Data: []byte("xyz")},
		{Name: "e", DType: BF16, Shape: []int64{0}, Data: nil},
	}
	if err := WriteFile(path, map[string]string{"format": "pt"}, tensors); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if f.Metadata["format"] != "pt" || len(f.Tensors) != 3 {
		t.Fatalf("header %+v", f.Header)
	}
	for _, w := range tensors {
		got, err := f.Data(w.Name)
		if err != nil || !bytes.Equal(got, w.Data) {
			t.Errorf("Data(%q) = %q, %v; want %q", w.Name, got, err, w.Data)
		}
		info, _ := f.Lookup(w.Name)
		dst := make([]byte, len(w.Data))
		if err := f.CopyTensor(dst, info); err != nil || !bytes.Equal(dst, w.Data) {
			t.Errorf("CopyTensor(%q) = %q, %v", w.Name, dst, err)
		}
	}
	if _, err := f.Data("nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Data of a missing tensor: %v", err)
	}
	info, _ := f.Lookup("w")
	if err := f.CopyTensor(make([]byte, 3), info); err == nil {
		t.Error("CopyTensor into a short buffer succeeded")
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Data("w"); err == nil {
		t.Error("Data after Close succeeded")
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestCopyTensorTruncatedUnderUs truncates a mapped file: reading the lost
// pages faults (SIGBUS), which CopyTensor must report as an error.
func TestCopyTensorTruncatedUnderUs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	big := make([]byte, 1<<20)
	if err := WriteFile(path, nil, []WriteTensor{{Name: "big", DType: U8, Shape: []int64{1 << 20}, Data: big}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	info, _ := f.Lookup("big")
	err = f.CopyTensor(make([]byte, len(big)), info)
	if err == nil || !strings.Contains(err.Error(), "memory fault") || !strings.Contains(err.Error(), `"big"`) {
		t.Fatalf("CopyTensor on a truncated file: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing.safetensors")); err == nil || !strings.Contains(err.Error(), "missing.safetensors") {
		t.Errorf("Open of a missing file: %v", err)
	}
	if _, err := Open(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Open of a directory: %v", err)
	}
}

func TestWriteFileRejects(t *testing.T) {
	tests := []struct {
		name     string
		metadata map[string]string
		tensors  []WriteTensor
		want     string
	}{
		{"duplicate name", nil, []WriteTensor{{Name: "a", DType: U8, Shape: []int64{1}, Data: []byte{1}}, {Name: "a", DType: U8, Shape: []int64{1}, Data: []byte{1}}}, `tensor "a": duplicate name`},
		{"size mismatch", nil, []WriteTensor{{Name: "a", DType: F32, Shape: []int64{2}, Data: []byte{1}}}, `write tensor "a": 1 bytes but shape [2] of F32 needs 8`},
		{"unknown dtype", nil, []WriteTensor{{Name: "a", DType: "F3", Shape: []int64{1}, Data: []byte{1}}}, `tensor "a": unknown dtype "F3"`},
		{"negative dim", nil, []WriteTensor{{Name: "a", DType: U8, Shape: []int64{-1}}}, "negative dimension"},
		{"reserved name", nil, []WriteTensor{{Name: "__metadata__", DType: U8, Shape: []int64{1}, Data: []byte{1}}}, "reserved"},
		{"invalid utf-8 name", nil, []WriteTensor{{Name: "a\xff", DType: U8, Shape: []int64{1}, Data: []byte{1}}}, "not valid UTF-8"},
		{"invalid utf-8 metadata", map[string]string{"k": "\xfe"}, nil, "valid UTF-8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "out.safetensors")
			err := WriteFile(path, tc.metadata, tc.tensors)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "out.safetensors") {
				t.Fatalf("WriteFile error %v, want one naming out.safetensors and %q", err, tc.want)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("failed write left %v behind", ents)
			}
		})
	}
}

func TestWriterOrderAndClose(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, nil, []TensorInfo{{Name: "small", DType: U8, Shape: []int64{1}}, {Name: "wide", DType: F64, Shape: []int64{1}}})
	if err != nil {
		t.Fatal(err)
	}
	if l := w.Layout(); l[0].Name != "wide" || l[1].Name != "small" || l[1].Begin != 8 {
		t.Fatalf("layout %+v: wider dtypes come first", l)
	}
	if err := w.WriteTensor("small", []byte{1}); err == nil || !strings.Contains(err.Error(), `expects tensor "wide" next`) {
		t.Errorf("out-of-order write: %v", err)
	}
	if err := w.WriteTensor("wide", make([]byte, 8)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err == nil || !strings.Contains(err.Error(), `"small"`) {
		t.Errorf("Close with a tensor missing: %v", err)
	}
	if err := w.WriteTensor("small", []byte{1}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader("buf", bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if h.HeaderLen%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", h.HeaderLen)
	}
}

func TestFileWriterAbortAndReplace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	fw, err := Create(path, nil, []TensorInfo{{Name: "a", DType: U8, Shape: []int64{2}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.WriteTensor("a", []byte{1, 2}); err != nil {
		t.Fatal(err)
	}
	if err := fw.Abort(); err != nil {
		t.Fatal(err)
	}
	if b := mustRead(t, path); string(b) != "old" {
		t.Errorf("Abort changed the destination: %q", b)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("Abort left %v", ents)
	}
	if err := WriteFile(path, nil, []WriteTensor{{Name: "a", DType: U8, Shape: []int64{2}, Data: []byte{1, 2}}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if d, _ := f.Data("a"); !bytes.Equal(d, []byte{1, 2}) {
		t.Errorf("replaced file holds %v", d)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644", st.Mode().Perm())
	}
}

func TestReadAt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	if err := WriteFile(path, nil, []WriteTensor{{Name: "a", DType: U8, Shape: []int64{4}, Data: []byte("abcd")}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, 3)
	if n, err := f.ReadAt(p, f.DataStart+1); n != 3 || err != nil || string(p) != "bcd" {
		t.Errorf("ReadAt = %d, %v, %q", n, err, p)
	}
	if n, err := f.ReadAt(p, f.DataStart+2); n != 2 || err != io.EOF {
		t.Errorf("ReadAt past the end = %d, %v", n, err)
	}
	if _, err := f.ReadAt(p, -1); err == nil {
		t.Error("ReadAt(-1) succeeded")
	}
}

// Unchanged is true until the path's file is written, retimed, truncated,
// renamed over or removed.
func TestUnchanged(t *testing.T) {
	later := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, path string)
		want   bool
	}{
		{"untouched", func(*testing.T, string) {}, true},
		{"read", func(t *testing.T, path string) {
			if _, err := os.ReadFile(path); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"written in place, times kept", func(t *testing.T, path string) {
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			// Kernels before 6.13 keep timestamps to the tick (up to 10
			// ms): let one pass so the write's ctime differs.
			time.Sleep(20 * time.Millisecond)
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("Z"), st.Size()-1); err != nil {
				t.Fatal(err)
			}
			f.Close()
			// Putting the modification time back still changes ctime.
			if err := os.Chtimes(path, st.ModTime(), st.ModTime()); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"modification time changed", func(t *testing.T, path string) {
			if err := os.Chtimes(path, later, later); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"truncated", func(t *testing.T, path string) {
			if err := os.Truncate(path, 8); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"renamed over", func(t *testing.T, path string) {
			other := path + ".new"
			if err := os.WriteFile(other, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(other, path); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"removed", func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "m.safetensors")
			if err := WriteFile(path, nil, []WriteTensor{{Name: "w", DType: U8, Shape: []int64{4}, Data: []byte("abcd")}}); err != nil {
				t.Fatal(err)
			}
			f, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			tc.change(t, path)
			if got := f.Unchanged(); got != tc.want {
				t.Errorf("Unchanged() = %v, want %v", got, tc.want)
			}
		})
	}
}
