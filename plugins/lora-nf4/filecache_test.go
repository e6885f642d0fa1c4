package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/samples"
)

// TestFileCache: an apply takes the file its plan parsed only while the
// file is unchanged, takes it once, and finds nothing after the TTL.
func TestFileCache(t *testing.T) {
	write := func(t *testing.T, path string, seed uint64) {
		t.Helper()
		if err := samples.WriteKohyaLoRA(path, samples.LoRAOptions{Rank: 4, Blocks: 1, Seed: seed}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name   string
		change func(t *testing.T, c *fileCache, path string) // between plan and apply
		hit    bool
	}{
		{"unchanged", func(*testing.T, *fileCache, string) {}, true},
		{"rewritten", func(t *testing.T, _ *fileCache, path string) {
			write(t, path, 99)
			// A rewrite within the file system's time granularity keeps the
			// size and may keep the time: move it on so the test is sure.
			later := time.Now().Add(time.Hour)
			if err := os.Chtimes(path, later, later); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"replaced by another file", func(t *testing.T, _ *fileCache, path string) {
			other := path + ".new"
			write(t, other, 3)
			if err := os.Rename(other, path); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"expired", func(_ *testing.T, c *fileCache, _ string) { c.clear() }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "a.safetensors")
			write(t, path, 3)
			var fc fileCache
			id, ok := statID(path)
			if !ok {
				t.Fatal("stat failed")
			}
			planned, err := lora.Parse(path)
			if err != nil {
				t.Fatal(err)
			}
			fc.keep(map[string]cachedFile{path: {id: id, f: planned}})
			c.change(t, &fc, path)
			got, _, _, err := fc.parse(path)
			if err != nil {
				t.Fatal(err)
			}
			if (got == planned) != c.hit {
				t.Fatalf("apply got the plan's parse: %v, want %v", got == planned, c.hit)
			}
			again, _, _, err := fc.parse(path)
			if err != nil {
				t.Fatal(err)
			}
			if again == planned {
				t.Fatal("a second apply got the plan's parse: the cache must give it once")
			}
		})
	}
}
