package cpuprofile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestStart(t *testing.T) {
	for _, c := range []struct {
		name  string
		dir   func(t *testing.T) string
		files int
		fails bool
	}{
		{"unset", func(*testing.T) string { return "" }, 0, false},
		{"new directory", func(t *testing.T) string { return filepath.Join(t.TempDir(), "a", "b") }, 1, false},
		{"directory is a file", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "f")
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			return p
		}, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := c.dir(t)
			t.Setenv(Env, dir)
			stop, err := Start("probe")
			if (err != nil) != c.fails {
				t.Fatalf("Start: %v, want failure %v", err, c.fails)
			}
			if err != nil {
				return
			}
			x := 0
			for i := range 1 << 22 {
				x ^= i * i
			}
			_ = x
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			if dir == "" {
				return
			}
			ps, _ := filepath.Glob(filepath.Join(dir, "probe-*.pprof"))
			if len(ps) != c.files {
				t.Fatalf("profiles %v, want %d", ps, c.files)
			}
			b, err := os.ReadFile(ps[0])
			if err != nil {
				t.Fatal(err)
			}
			// A pprof profile is a gzipped protocol buffer.
			if len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
				t.Fatalf("%s (%d bytes) is not a gzipped pprof profile", ps[0], len(b))
			}
		})
	}
}
