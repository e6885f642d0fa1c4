package registry

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestSourceKeptMapped: a loaded model keeps its file mapped: every
// tensor's bytes read back from it equal the arena's, also after another
// file was renamed over the path; an in-place write shows through;
// DetachSource and Unload let go of it.
func TestSourceKeptMapped(t *testing.T) {
	a := newTestArena(t, 64<<20, 1<<20)
	reg := New(a, quiet())
	ctx := context.Background()
	raw, err := os.ReadFile(filepath.Join("testdata", "bnb", "nested.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "m.safetensors")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := reg.Load(ctx, "m", path)
	if err != nil {
		t.Fatal(err)
	}
	// Another file over the path: the mapping still shows the loaded one.
	if err := os.WriteFile(path+".new", bytes.Repeat([]byte{7}, len(raw)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
	var first SourceRef
	err = reg.WriteLocked("m", func(m *Model) error {
		for _, tn := range m.Tensors {
			ref, ok := m.SourceOf(tn.Name)
			if tn.NBytes == 0 {
				if ok {
					t.Errorf("%s: a source for an empty tensor", tn.Name)
				}
				continue
			}
			if !ok || ref.File != path || ref.Tensor != tn.Name || uint64(ref.Length) != tn.NBytes {
				t.Fatalf("%s: source %+v, ok %v", tn.Name, ref, ok)
			}
			if first.Length == 0 {
				first = ref
			}
			got := make([]byte, ref.Length)
			if err := m.ReadSource(ref, 0, got); err != nil {
				return err
			}
			want, err := a.Bytes(tn.Region)
			if err != nil {
				return err
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: the source bytes differ from the arena's", tn.Name)
			}
		}
		if err := m.ReadSource(first, first.Length-1, make([]byte, 2)); err == nil {
			t.Error("a read past the tensor's end succeeded")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.SourceOf("no such tensor"); ok {
		t.Error("a source for an unknown tensor")
	}
	if err := reg.DetachSource("m"); err != nil {
		t.Fatal(err)
	}
	if _, ok := m.SourceOf(first.Tensor); ok {
		t.Error("a source after DetachSource")
	}
	if err := m.ReadSource(first, 0, make([]byte, 1)); !errors.Is(err, ErrNotFound) {
		t.Errorf("ReadSource after DetachSource: %v, want ErrNotFound", err)
	}
	if err := reg.DetachSource("m"); err != nil {
		t.Errorf("second DetachSource: %v", err)
	}
	if err := reg.Unload("m"); err != nil {
		t.Fatal(err)
	}
	if err := reg.DetachSource("m"); !errors.Is(err, ErrNotFound) {
		t.Errorf("DetachSource of an unloaded model: %v", err)
	}

	// An in-place write shows through the mapping (readers checksum).
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Load(ctx, "m", path); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{^raw[first.Offset]}, first.Offset); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if err := reg.WriteLocked("m", func(m *Model) error { return m.ReadSource(first, 0, b) }); err != nil {
		t.Fatal(err)
	}
	if b[0] != ^raw[first.Offset] {
		t.Error("an in-place write to the file did not show through the mapping")
	}
}
