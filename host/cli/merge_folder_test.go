package cli

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A folder --out needs diffusers names and an empty or new folder; the
// sample model is BFL-named, so it must go to a file.
func TestMergeFolderOutRefused(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	dir := t.TempDir()
	full := filepath.Join(dir, "full")
	if err := os.MkdirAll(full, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(full, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		out, want string
	}{
		{filepath.Join(dir, "out"), "diffusers loads only with its own module names"},
		{full, "diffusers loads only with its own module names"}, // names are checked first
	} {
		_, err := Merge(context.Background(), MergeOptions{Model: model, Out: tc.out, As: "nf4", LoRAs: []MergeLoRA{{Path: kohya, Strength: 1}}})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.out, err, tc.want)
		}
		if _, err := os.Stat(filepath.Join(dir, "out")); err == nil {
			t.Errorf("%s: a refused merge left its output", tc.out)
		}
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*"))
	if len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestByteSizeFlag(t *testing.T) {
	for in, want := range map[string]int64{"10GB": 10_000_000_000, "500MB": 500_000_000, "2GiB": 2 << 30, "150KB": 150_000, "1.5MiB": 3 << 19, "4096": 4096, " 7 kib ": 7 << 10} {
		var v int64
		if err := (byteSize{&v}).Set(in); err != nil || v != want {
			t.Errorf("%q: %d, %v; want %d", in, v, err, want)
		}
	}
	for _, bad := range []string{"", "GB", "-1MB", "ten", "0"} {
		var v int64
		if err := (byteSize{&v}).Set(bad); err == nil {
			t.Errorf("%q accepted as %d", bad, v)
		}
	}
}
