package lora_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/shared/samples"
)

// loadOwnCopy copies the sample model to a file of the test's own and
// loads it as model "own", so the test can change the file.
func loadOwnCopy(t *testing.T, s *server.Server) string {
	t.Helper()
	_, models, _ := fixtures(t)
	raw, err := os.ReadFile(filepath.Join(models, samples.ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "own.safetensors")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Registry.Load(t.Context(), "own", path); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestFileJournalRemoveByteExact: fuse, re-fuse a smaller set (a weight
// restored by the host from the file), remove: byte-exact, nothing left in
// the arena, with the journal in the file and, with the model's source
// detached, in the arena; on every backend.
func TestFileJournalRemoveByteExact(t *testing.T) {
	for _, backend := range backends {
		for _, kind := range []string{"file", "arena"} {
			t.Run(backend+"/"+kind, func(t *testing.T) {
				s := newHostOn(t, backend)
				_, _, dir := fixtures(t)
				if kind == "arena" {
					if err := s.Registry.DetachSource(server.DefaultModelName); err != nil {
						t.Fatal(err)
					}
				}
				orig := snapshot(t, s)
				level := s.Arena.Stats().Allocated
				res, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, kohyaOracle(1), peftOracle(0.7)), Mode: lora.ModeFuse})
				if err != nil {
					t.Fatal(err)
				}
				inFile := kind == "file"
				if inFile != (res.JournalFileBytes > 0 && res.JournalBytes == 0) || inFile == (res.JournalBytes > 0) {
					t.Fatalf("%s journal: %d bytes in the arena, %d referenced in the file", kind, res.JournalBytes, res.JournalFileBytes)
				}
				if grew := s.Arena.Stats().Allocated - level; uint64(grew) != res.JournalBytes {
					t.Errorf("the arena grew by %d bytes for a journal of %d", grew, res.JournalBytes)
				}
				st, err := s.LoRAs.State("")
				if err != nil || st.JournalBytes != res.JournalBytes || st.JournalFileBytes != res.JournalFileBytes {
					t.Errorf("state %+v (%v), apply said %d/%d", st, err, res.JournalBytes, res.JournalFileBytes)
				}
				fused := snapshot(t, s)
				if _, err := s.LoRAs.Apply(t.Context(), lora.Request{LoRAs: entries(dir, kohyaOracle(0.3)), Mode: lora.ModeFuse}); err != nil {
					t.Fatal(err)
				}
				if sameMaps(fused, snapshot(t, s)) {
					t.Fatal("the second fuse changed nothing")
				}
				if _, err := s.LoRAs.Remove(t.Context(), ""); err != nil {
					t.Fatal(err)
				}
				sameBytes(t, "remove after fuse", orig, snapshot(t, s))
				if a := s.Arena.Stats().Allocated; a != level {
					t.Errorf("arena at %d after remove, %d before apply", a, level)
				}
			})
		}
	}
}

func sameMaps(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if string(b[k]) != string(v) {
			return false
		}
	}
	return true
}

// TestSourceModifiedInPlace: a model file written in place after the
// load loses the originals of a journal that only references it; remove
// and a re-apply then fail naming the file and the tensor, and the model
// keeps its fused bytes and state. A journal that also keeps the
// originals in host memory (the default budget) does not need the file:
// remove puts back every original byte.
func TestSourceModifiedInPlace(t *testing.T) {
	t.Run("file references only", func(t *testing.T) {
		s := newHost(t)
		s.LoRAs.JournalMemory = 0
		_, _, dir := fixtures(t)
		path := loadOwnCopy(t, s)
		res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, kohyaOracle(1)), Mode: lora.ModeFuse})
		if err != nil {
			t.Fatal(err)
		}
		if res.JournalMemoryBytes != 0 || s.LoRAs.MemoryHeld() != 0 {
			t.Fatalf("budget 0: %d bytes kept in memory (%d held)", res.JournalMemoryBytes, s.LoRAs.MemoryHeld())
		}
		fused := snapshotOf(t, s, "own")
		level := s.Arena.Stats().Allocated
		// Flip one byte of a fused weight's packed codes in the file itself.
		const w = "double_blocks.0.img_attn.qkv.weight"
		flipInFile(t, s, "own", path, w)
		for _, op := range []struct {
			name string
			run  func() error
		}{
			{"remove", func() error { _, err := s.LoRAs.Remove(t.Context(), "own"); return err }},
			{"re-apply", func() error {
				_, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, peftOracle(1)), Mode: lora.ModeFuse})
				return err
			}},
		} {
			err := op.run()
			if err == nil {
				t.Fatalf("%s succeeded with the model file modified in place", op.name)
			}
			if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, w) || !strings.Contains(msg, "changed since it was loaded") {
				t.Errorf("%s: error %q does not name the file, the tensor and the cause", op.name, msg)
			}
			sameBytes(t, op.name+" re-fused", fused, snapshotOf(t, s, "own"))
			if st, _ := s.LoRAs.State("own"); st.Mode != lora.ModeFuse || len(st.LoRAs) != 1 {
				t.Errorf("%s refused: state %+v, want the fused set", op.name, st)
			}
			if a := s.Arena.Stats().Allocated; a != level {
				t.Errorf("%s refused: arena at %d, %d before", op.name, a, level)
			}
		}
	})
	for _, where := range []string{"memory", "arena"} {
		t.Run("copy in "+where, func(t *testing.T) {
			s := newHost(t)
			if where == "arena" {
				s.LoRAs.JournalArena = 1 << 30
			}
			_, _, dir := fixtures(t)
			path := loadOwnCopy(t, s)
			orig := snapshotOf(t, s, "own")
			level := s.Arena.Stats().Allocated
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, kohyaOracle(1)), Mode: lora.ModeFuse}); err != nil {
				t.Fatal(err)
			}
			// The host-memory copy is taken in the background after the apply.
			if err := s.LoRAs.WaitJournalCopies(t.Context(), "own"); err != nil {
				t.Fatal(err)
			}
			res, err := s.LoRAs.State("own")
			if err != nil {
				t.Fatal(err)
			}
			copied, inArena := res.JournalMemoryBytes, uint64(0)
			if where == "arena" {
				copied, inArena = res.JournalBytes, res.JournalBytes
			}
			if copied == 0 || copied != res.JournalFileBytes || res.JournalBytes != inArena || uint64(s.Arena.Stats().Allocated) < uint64(level)+inArena {
				t.Fatalf("journal: %d bytes in memory, %d referenced, %d in the arena (arena %d → %d)", res.JournalMemoryBytes, res.JournalFileBytes, res.JournalBytes, level, s.Arena.Stats().Allocated)
			}
			flipInFile(t, s, "own", path, "double_blocks.0.img_attn.qkv.weight")
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, peftOracle(1)), Mode: lora.ModeFuse}); err != nil {
				t.Fatalf("re-apply with the originals copied: %v", err)
			}
			if _, err := s.LoRAs.Remove(t.Context(), "own"); err != nil {
				t.Fatalf("remove with the originals copied: %v", err)
			}
			sameBytes(t, "remove from the copy", orig, snapshotOf(t, s, "own"))
			if n := s.LoRAs.MemoryHeld(); n != 0 {
				t.Errorf("%d bytes of copies held after remove", n)
			}
			if a := s.Arena.Stats().Allocated; a != level {
				t.Errorf("arena at %d after remove, %d before", a, level)
			}
		})
	}
}

// TestSourceRenamedOver: a file renamed over the model's path after the
// load does not change the originals: the registry reads the file it
// loaded, which it keeps mapped.
func TestSourceRenamedOver(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			s := newHostOn(t, backend)
			_, _, dir := fixtures(t)
			path := loadOwnCopy(t, s)
			orig := snapshotOf(t, s, "own")
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, kohyaOracle(1), peftOracle(1)), Mode: lora.ModeFuse}); err != nil {
				t.Fatal(err)
			}
			other := filepath.Join(filepath.Dir(path), "other.safetensors")
			if err := samples.WriteModel(other, samples.ModelOptions{Seed: 2}); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(other, path); err != nil {
				t.Fatal(err)
			}
			if _, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, peftOracle(0.5)), Mode: lora.ModeFuse}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.LoRAs.Remove(t.Context(), "own"); err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "remove after the file was replaced", orig, snapshotOf(t, s, "own"))
		})
	}
}

// TestCancelledFuseRollsBack: an apply whose context ends mid-pass fails,
// and once it returned the model holds its original bytes, for good (the
// host waits for the pass to stop before its rollback).
func TestCancelledFuseRollsBack(t *testing.T) {
	t.Setenv("LORA_NF4_LAYER_DELAY", "30ms")
	s := newHost(t)
	_, _, dir := fixtures(t)
	orig := snapshot(t, s)
	level := s.Arena.Stats().Allocated
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	if _, err := s.LoRAs.Apply(ctx, lora.Request{LoRAs: entries(dir, kohyaOracle(1), peftOracle(1)), Mode: lora.ModeFuse}); err == nil {
		t.Fatal("a fuse cancelled mid-pass succeeded")
	}
	sameBytes(t, "after the cancelled fuse", orig, snapshot(t, s))
	time.Sleep(200 * time.Millisecond)
	sameBytes(t, "a while after the cancelled fuse", orig, snapshot(t, s))
	if st, _ := s.LoRAs.State(""); st.Mode != "" {
		t.Errorf("state after the cancelled fuse: %+v", st)
	}
	if a := s.Arena.Stats().Allocated; a != level {
		t.Errorf("arena at %d after the cancelled fuse, %d before", a, level)
	}
}

// flipInFile flips one byte of tensor's bytes in model's source file,
// in place.
func flipInFile(t *testing.T, s *server.Server, model, path, tensor string) {
	t.Helper()
	var ref registry.SourceRef
	if err := s.Registry.WriteLocked(model, func(m *registry.Model) error {
		var ok bool
		if ref, ok = m.SourceOf(tensor); !ok {
			t.Fatalf("model %s holds no source for %s", model, tensor)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, ref.Offset+ref.Length/2); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, ref.Offset+ref.Length/2); err != nil {
		t.Fatal(err)
	}
}

// TestSourceDiffersAtFirstFuse: a weight whose file bytes no longer equal
// the arena's when first fused is journaled as an arena copy (the others
// still by reference), and remove is byte-exact.
func TestSourceDiffersAtFirstFuse(t *testing.T) {
	s := newHost(t)
	_, _, dir := fixtures(t)
	path := loadOwnCopy(t, s)
	orig := snapshotOf(t, s, "own")
	const w = "double_blocks.0.img_attn.qkv.weight"
	flipInFile(t, s, "own", path, w)
	res, err := s.LoRAs.Apply(t.Context(), lora.Request{Model: "own", LoRAs: entries(dir, kohyaOracle(1)), Mode: lora.ModeFuse})
	if err != nil {
		t.Fatal(err)
	}
	qw, err := s.Registry.Weight("own", w)
	if err != nil {
		t.Fatal(err)
	}
	if want := qw.Packed.NBytes + qw.Absmax.NBytes; res.JournalBytes != want || res.JournalFileBytes == 0 {
		t.Errorf("journal: %d bytes in the arena (want %d: %s copied), %d in the file", res.JournalBytes, want, w, res.JournalFileBytes)
	}
	if _, err := s.LoRAs.Remove(t.Context(), "own"); err != nil {
		t.Fatal(err)
	}
	sameBytes(t, "remove", orig, snapshotOf(t, s, "own"))
}
