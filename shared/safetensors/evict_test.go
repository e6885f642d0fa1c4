package safetensors

import (
	"bytes"
	"path/filepath"
	"testing"
)

// TestEvict: after Evict the tensor's bytes (and its neighbours') read the
// same, faulted back in from the file; unknown names are ignored.
func TestEvict(t *testing.T) {
	big := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7}, 3<<12)
	small := []byte{9, 8, 7}
	path := filepath.Join(t.TempDir(), "e.safetensors")
	if err := WriteFile(path, nil, []WriteTensor{{Name: "small", DType: U8, Shape: []int64{3}, Data: small}, {Name: "big", DType: U8, Shape: []int64{int64(len(big))}, Data: big}}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, name := range []string{"big", "small", "missing"} {
		if err := f.Evict(name); err != nil {
			t.Fatalf("evict %s: %v", name, err)
		}
	}
	for name, want := range map[string][]byte{"big": big, "small": small} {
		got, err := f.Data(name)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after evict: %v, equal %v", name, err, bytes.Equal(got, want))
		}
	}
}
