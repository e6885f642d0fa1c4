//go:build linux

package lora

import (
	"bytes"
	"context"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
	"github.com/arenahost/arenahost/shared/samples"
)

// TestJournalOnEveryBackend: the fuse journal (saveBytes, putBack) and the
// factor copies move bytes region to region, so they work on arenas the
// host cannot map as on shared memory.
func TestJournalOnEveryBackend(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	path := filepath.Join(t.TempDir(), samples.ModelFile)
	if err := samples.WriteModel(path, samples.ModelOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	cfg := arena.Config{Capacity: 256 << 20, SegmentSize: 4 << 20, RetainEmpty: true, Logger: log}
	backends := []struct {
		name string
		new  func(t *testing.T) *arena.Arena
	}{
		{"cpu", func(t *testing.T) *arena.Arena {
			b, err := arena.NewCPUBackend(arena.CPUConfig{Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			a, err := arena.New(t.Context(), b, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = a.Close() })
			return a
		}},
		{"fake device", func(t *testing.T) *arena.Arena {
			a, err := arena.New(t.Context(), arenatest.NewFakeDevice(0), cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = a.Close() })
			return a
		}},
		{"gpusim", func(t *testing.T) *arena.Arena {
			d := gpusim.NewCapacity(0, 256<<20)
			a, _, err := cuda.NewArena(t.Context(), d, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = a.Close()
				_ = d.Close()
			})
			return a
		}},
	}
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			ctx := context.Background()
			a := be.new(t)
			reg := registry.New(a, log)
			m, err := reg.Load(ctx, "m", path)
			if err != nil {
				t.Fatal(err)
			}
			mem := &countingMem{Arena: a}
			c := New(reg, registry.NewBindings(a), mem, nil, log)
			qw := m.Weights[0]
			read := func(tn *registry.Tensor) []byte {
				b := make([]byte, tn.NBytes)
				if err := a.Read(tn.Region, 0, b); err != nil {
					t.Fatal(err)
				}
				return b
			}
			packed, absmax := read(qw.Packed), read(qw.Absmax)

			e, err := c.saveBytes(m, qw.Name, "lora journal")
			if err != nil {
				t.Fatal(err)
			}
			if len(e.saved) != 2 || e.saved[0].Length != qw.Packed.NBytes || e.saved[1].Length != qw.Absmax.NBytes {
				t.Fatalf("journal entry %+v for %d and %d bytes", e, qw.Packed.NBytes, qw.Absmax.NBytes)
			}
			// "Fuse": overwrite the weight, as the plugin would.
			if err := a.Write(ctx, qw.Packed.Region, 0, bytes.Repeat([]byte{0xa5}, int(qw.Packed.NBytes))); err != nil {
				t.Fatal(err)
			}
			if err := a.Write(ctx, qw.Absmax.Region, 0, make([]byte, qw.Absmax.NBytes)); err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(read(qw.Packed), packed) {
				t.Fatal("the weight did not change")
			}
			if err := c.putBack(m, qw.Name, e); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(read(qw.Packed), packed) || !bytes.Equal(read(qw.Absmax), absmax) {
				t.Fatal("putBack did not restore the journaled bytes")
			}
			// A journal entry of the wrong size is refused, changing nothing.
			short := journalEntry{saved: slices.Clone(e.saved)}
			short.saved[0].Length--
			if err := c.putBack(m, qw.Name, short); err == nil {
				t.Fatal("putBack of a short journal entry succeeded")
			}
			c.freeEntry(e)

			// The file journal: a reference into the model's file with
			// the CRC the load took, reading nothing back from the arena
			// (a download on a device); put back from the file with one
			// WriteFrom per tensor (straight into the mapping on the CPU,
			// through the staging buffer on a device) after a CRC check.
			// With the in-memory copy (the default budget) the copy comes
			// from the file too, and the put back is one Write per tensor.
			for _, budget := range []int64{0, JournalMemoryAuto} {
				c.JournalMemory = budget
				level := a.Stats().Allocated
				if err := reg.WriteLocked("m", func(m *registry.Model) error {
					*mem = countingMem{Arena: a}
					fe, err := c.journal(m, qw.Name)
					if err != nil {
						return err
					}
					if !fe.referenced() || fe.arenaBytes() != 0 || fe.fileBytes() != qw.Packed.NBytes+qw.Absmax.NBytes {
						t.Fatalf("file journal entry %+v", fe)
					}
					if mem.reads != 0 || fe.refs[0].crc != crc32.Checksum(packed, castagnoli) || fe.refs[1].crc != crc32.Checksum(absmax, castagnoli) {
						t.Fatalf("journal read %d times from the arena; CRCs %08x %08x", mem.reads, fe.refs[0].crc, fe.refs[1].crc)
					}
					if a.Stats().Allocated != level {
						t.Fatal("the file journal allocated arena")
					}
					if budget != 0 {
						// What fillCopies does after an apply, for this entry.
						fe.mem = c.copyOriginals(m, qw.Name, fe.refs)
						if mem.reads != 0 {
							t.Fatalf("the in-memory copy read %d times from the arena", mem.reads)
						}
					}
					if err := a.Write(ctx, qw.Packed.Region, 0, bytes.Repeat([]byte{0x5a}, int(qw.Packed.NBytes))); err != nil {
						return err
					}
					if err := a.Write(ctx, qw.Absmax.Region, 0, bytes.Repeat([]byte{1}, int(qw.Absmax.NBytes))); err != nil {
						return err
					}
					*mem = countingMem{Arena: a}
					if err := c.putBack(m, qw.Name, fe); err != nil {
						return err
					}
					switch {
					case budget == 0 && (mem.fills != 2 || mem.writes != 0 || fe.memBytes() != 0):
						t.Fatalf("putBack from the file: %d WriteFrom and %d Write calls, want 2 and none", mem.fills, mem.writes)
					case budget != 0 && (mem.fills != 0 || mem.writes < 2 || fe.memBytes() != fe.fileBytes() || c.MemoryHeld() != int64(fe.fileBytes())):
						t.Fatalf("putBack from the in-memory copy (%d bytes, %d held): %d WriteFrom and %d Write calls, want none and ≥ 2",
							fe.memBytes(), c.MemoryHeld(), mem.fills, mem.writes)
					}
					c.freeEntry(fe)
					if c.MemoryHeld() != 0 {
						t.Fatalf("%d bytes held after the entry was freed", c.MemoryHeld())
					}
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(read(qw.Packed), packed) || !bytes.Equal(read(qw.Absmax), absmax) {
					t.Fatalf("putBack (memory budget %d) did not restore the original bytes", budget)
				}
			}
			// A file retimed since the load is checksummed: same bytes, so
			// still a reference, restored after the CRC check.
			later := time.Now().Add(time.Hour)
			if err := os.Chtimes(path, later, later); err != nil {
				t.Fatal(err)
			}
			if err := reg.WriteLocked("m", func(m *registry.Model) error {
				if m.SourceUnchanged() {
					t.Fatal("a retimed source file reported unchanged")
				}
				fe, err := c.journal(m, qw.Name)
				if err != nil {
					return err
				}
				defer c.freeEntry(fe)
				if !fe.referenced() {
					t.Fatalf("journal entry for a retimed file holding the same bytes: %+v", fe)
				}
				if err := a.Write(ctx, qw.Packed.Region, 0, bytes.Repeat([]byte{0x5a}, int(qw.Packed.NBytes))); err != nil {
					return err
				}
				return c.restore(m, map[string]journalEntry{qw.Name: fe})
			}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(read(qw.Packed), packed) {
				t.Fatal("restore after the file was retimed did not put the bytes back")
			}
			// Without a source file, the journal copies into the arena.

			if err := reg.DetachSource("m"); err != nil {
				t.Fatal(err)
			}
			if err := reg.WriteLocked("m", func(m *registry.Model) error {
				fe, err := c.journal(m, qw.Name)
				if err == nil && (fe.referenced() || fe.arenaBytes() != qw.Packed.NBytes+qw.Absmax.NBytes) {
					t.Errorf("journal entry without a source file: %+v", fe)
				}
				c.freeEntry(fe)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if err := reg.Unload("m"); err != nil {
				t.Fatal(err)
			}
			if st := a.Stats(); st.Allocated != 0 {
				t.Fatalf("after freeing the journal and unloading: %v allocated", st.Allocated)
			}
		})
	}
}

// countingMem is an arena that counts the journal's reads and writes.
type countingMem struct {
	*arena.Arena
	reads, writes, fills int
}

func (m *countingMem) Read(r arena.Region, off uint64, p []byte) error {
	m.reads++
	return m.Arena.Read(r, off, p)
}

func (m *countingMem) Write(ctx context.Context, r arena.Region, off uint64, p []byte) error {
	m.writes++
	return m.Arena.Write(ctx, r, off, p)
}

func (m *countingMem) WriteFrom(ctx context.Context, r arena.Region, off uint64, src io.ReaderAt, srcOff, n int64) error {
	m.fills++
	return m.Arena.WriteFrom(ctx, r, off, src, srcOff, n)
}
