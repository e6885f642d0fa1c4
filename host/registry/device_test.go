//go:build linux

package registry

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/host/samples"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// deviceArenas are arenas whose memory the host cannot map: the registry
// must load, save and view them through the arena's Read and Write.
var deviceArenas = []struct {
	name string
	new  func(t *testing.T) *arena.Arena
}{
	{"fake device", func(t *testing.T) *arena.Arena {
		a, err := arena.New(t.Context(), arenatest.NewFakeDevice(0), arena.Config{Capacity: 256 << 20, SegmentSize: 4 << 20, RetainEmpty: true, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := a.Close(); err != nil {
				t.Error(err)
			}
		})
		return a
	}},
	{"gpusim", func(t *testing.T) *arena.Arena {
		d := gpusim.NewCapacity(0, 256<<20)
		a, _, err := cuda.NewArena(t.Context(), d, arena.Config{Capacity: 256 << 20, SegmentSize: 4 << 20, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := a.Close(); err != nil {
				t.Error(err)
			}
			if err := d.Close(); err != nil {
				t.Error(err)
			}
		})
		return a
	}},
}

// writeCounter records the largest Write, to check that loads stream.
type writeCounter struct {
	Memory
	mu      sync.Mutex
	writes  int
	largest int
	failAt  int // fail the failAt-th Write when non-zero
}

var errWrite = errors.New("cuMemcpyHtoDAsync: CUDA_ERROR_LAUNCH_FAILED")

func (w *writeCounter) Write(ctx context.Context, r arena.Region, off uint64, p []byte) error {
	w.mu.Lock()
	w.writes++
	w.largest = max(w.largest, len(p))
	fail := w.failAt != 0 && w.writes == w.failAt
	w.mu.Unlock()
	if fail {
		return errWrite
	}
	return w.Memory.Write(ctx, r, off, p)
}

// TestDeviceArena loads the sample model and the bitsandbytes fixtures
// into arenas the host cannot map, streaming every tensor through a small
// buffer, writes them back byte for byte, and views tensors by download.
func TestDeviceArena(t *testing.T) {
	sample := filepath.Join(t.TempDir(), samples.ModelFile)
	if err := samples.WriteModel(sample, samples.ModelOptions{Seed: 1}); err != nil {
		t.Fatal(err)
	}
	files := []string{sample, filepath.Join("testdata", "bnb", "nested.safetensors"), filepath.Join("testdata", "bnb", "plain.safetensors")}
	defer func(c int) { copyChunk = c }(copyChunk)
	copyChunk = 4096 // every tensor larger than this arrives in several writes

	for _, da := range deviceArenas {
		for _, file := range files {
			t.Run(da.name+"/"+filepath.Base(file), func(t *testing.T) {
				a := da.new(t)
				if a.Mapped() {
					t.Fatal("the device arena says the host maps it")
				}
				mem := &writeCounter{Memory: a}
				reg := New(mem, quiet())
				m, err := reg.Load(t.Context(), "m", file)
				if err != nil {
					t.Fatal(err)
				}
				want := 0 // one write per chunk of each non-empty tensor
				for _, tn := range m.Tensors {
					want += int((tn.NBytes + uint64(copyChunk) - 1) / uint64(copyChunk))
				}
				if mem.largest > copyChunk || mem.writes != want {
					t.Fatalf("%d writes for %d tensors, the largest %d bytes: want %d, none over %d bytes",
						mem.writes, len(m.Tensors), mem.largest, want, copyChunk)
				}
				out := filepath.Join(t.TempDir(), "saved.safetensors")
				if err := reg.Save(t.Context(), "m", out); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(readFile(t, out), readFile(t, file)) {
					t.Fatal("the saved file differs from the source")
				}
				src, err := safetensors.Open(file)
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				for _, tn := range m.Tensors {
					want, err := src.Data(tn.Name)
					if err != nil {
						t.Fatal(err)
					}
					err = reg.View("m", tn.Name, func(_ *Tensor, b []byte) error {
						if !bytes.Equal(b, want) {
							t.Errorf("view of %s differs from the file", tn.Name)
						}
						return nil
					})
					if err != nil {
						t.Fatal(err)
					}
				}
				big := m.Tensors[0]
				for _, tn := range m.Tensors {
					if tn.NBytes > big.NBytes {
						big = tn
					}
				}
				if _, err := reg.TensorBytes(big); !errors.Is(err, arena.ErrNoHostView) {
					t.Fatalf("TensorBytes on a device arena: %v, want ErrNoHostView", err)
				}
				if err := reg.Unload("m"); err != nil {
					t.Fatal(err)
				}
				if st := a.Stats(); st.Allocated != 0 || st.Regions != 0 {
					t.Fatalf("after unload: %v in %d regions", st.Allocated, st.Regions)
				}
			})
		}
	}
}

// TestDeviceLoadRollsBack: a load that fails part way (a truncated file, an
// upload error, cancellation) leaves nothing allocated on the device.
func TestDeviceLoadRollsBack(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ckpt.safetensors")
	writeCheckpoint(t, path, checkpointSpec{rows: 512, cols: 256, weights: 8, blocksize: 64, nested: true, seed: 3})
	truncated := filepath.Join(dir, "truncated.safetensors")
	raw := readFile(t, path)
	if err := os.WriteFile(truncated, raw[:len(raw)-1000], 0o644); err != nil {
		t.Fatal(err)
	}
	defer func(c int) { copyChunk = c }(copyChunk)
	copyChunk = 8192

	for _, da := range deviceArenas {
		tests := []struct {
			name   string
			file   string
			failAt int
			cancel bool
			want   string
		}{
			{"truncated file", truncated, 0, false, "truncated"},
			{"upload fails late", path, 20, false, errWrite.Error()},
			{"cancelled", path, 0, true, context.Canceled.Error()},
		}
		for _, tc := range tests {
			t.Run(da.name+"/"+tc.name, func(t *testing.T) {
				a := da.new(t)
				mem := &writeCounter{Memory: a, failAt: tc.failAt}
				ctx := t.Context()
				if tc.cancel {
					var cancel context.CancelFunc
					ctx, cancel = context.WithCancel(ctx)
					cancel()
				}
				reg := New(mem, quiet())
				_, err := reg.Load(ctx, "m", tc.file)
				if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.file) {
					t.Fatalf("load: %v, want an error naming %s and %q", err, tc.file, tc.want)
				}
				if st := a.Stats(); st.Allocated != 0 || st.Regions != 0 {
					t.Errorf("after the failed load: %v in %d regions still allocated", st.Allocated, st.Regions)
				}
				if ms := reg.Models(); len(ms) != 0 {
					t.Errorf("failed load registered %v", ms)
				}
			})
		}
	}
}
