package cli

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// within runs fn and fails if it takes longer than bound (a FIFO must not
// hang the CLI).
func within(t *testing.T, bound time.Duration, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(bound):
		t.Fatalf("%s blocked for %v", what, bound)
		return nil
	}
}

// TestHostileFilesCLI: inspect and merge refuse FIFOs, directories and
// symlink loops at once, naming the path.
func TestHostileFilesCLI(t *testing.T) {
	model, kohya, _ := mergeFixture(t, false)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.safetensors")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	loop := filepath.Join(dir, "loop.safetensors")
	if err := os.Symlink(loop, loop); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out.safetensors")
	for _, p := range []string{fifo, loop, dir} {
		err := within(t, 2*time.Second, "inspect "+p, func() error { _, _, err := run(t, "inspect", p); return err })
		if err == nil || !strings.Contains(err.Error(), filepath.Base(p)) {
			t.Errorf("inspect %s: %v", p, err)
		}
		for name, o := range map[string]MergeOptions{
			"model": {Model: p, Out: out, As: "nf4"},
			"lora":  {Model: model, Out: out, As: "nf4", LoRAs: []MergeLoRA{{Path: p, Strength: 1}}},
		} {
			err := within(t, 2*time.Second, "merge "+name+" "+p, func() error { _, err := Merge(context.Background(), o); return err })
			if name == "model" && p == dir {
				// A directory is a model folder; this one holds no weights.
				if err == nil || !strings.Contains(err.Error(), "no weights in "+dir) {
					t.Errorf("merge with model folder %s: %v, want 'no weights in' naming it", p, err)
				}
				continue
			}
			if !errors.Is(err, safetensors.ErrBadPath) {
				t.Errorf("merge with %s %s: %v, want ErrBadPath", name, p, err)
			}
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Fatal("output written despite the errors")
	}
	_ = kohya
}

// TestMergeRefusesNonFinite: a strength that overflows the merged weights
// fails naming the tensor or layer, for every output kind, and writes
// nothing; an infinite strength is refused by the flag.
func TestMergeRefusesNonFinite(t *testing.T) {
	for _, nested := range []bool{false, true} {
		model, kohya, _ := mergeFixture(t, nested)
		out := filepath.Join(t.TempDir(), "out.safetensors")
		for _, as := range []string{"nf4", "bf16", "lora"} {
			for _, s := range []float64{1e308, -1e308} {
				_, err := Merge(context.Background(), MergeOptions{Model: model, Out: out, As: as, LoRAs: []MergeLoRA{{Path: kohya, Strength: s}}})
				if !errors.Is(err, lora.ErrNonFinite) {
					t.Errorf("nested %v, as %s, strength %g: %v, want ErrNonFinite", nested, as, s, err)
				}
				if _, err := os.Stat(out); err == nil {
					t.Fatalf("nested %v, as %s: output written despite the error", nested, as)
				}
			}
		}
	}
	if _, _, err := run(t, "merge", "--model", "m", "--lora", "x.safetensors:inf", "--out", "o", "--as", "nf4"); err == nil || !strings.Contains(err.Error(), "not a finite number") {
		t.Fatalf("--lora with an infinite strength: %v", err)
	}
}
