//go:build linux

package registry

import (
	"bytes"
	"context"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
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

// writeCounter records the registry's writes into device memory, to check
// that loads stream and which path they take: the Write calls (and the
// largest) and, through fillCounter, the WriteFrom calls. failAt fails the
// failAt-th write of either kind when non-zero; onAlloc, when set, runs
// before the n-th Alloc (1-based).
type writeCounter struct {
	Memory
	mu      sync.Mutex
	writes  int
	fills   int
	largest int
	failAt  int
	allocs  int
	onAlloc func(n int)
}

var errWrite = errors.New("cuMemcpyHtoDAsync: CUDA_ERROR_LAUNCH_FAILED")

// count records one write and says whether it is to fail.
func (w *writeCounter) count(fill bool, n int) (fail bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if fill {
		w.fills++
	} else {
		w.writes++
		w.largest = max(w.largest, n)
	}
	return w.failAt != 0 && w.writes+w.fills == w.failAt
}

func (w *writeCounter) Alloc(owner arena.Owner, name string, n uint64) (arena.Region, error) {
	w.mu.Lock()
	w.allocs++
	k := w.allocs
	w.mu.Unlock()
	if w.onAlloc != nil {
		w.onAlloc(k)
	}
	return w.Memory.Alloc(owner, name, n)
}

func (w *writeCounter) Write(ctx context.Context, r arena.Region, off uint64, p []byte) error {
	if w.count(false, len(p)) {
		return errWrite
	}
	return w.Memory.Write(ctx, r, off, p)
}

// fillCounter is a writeCounter over memory with WriteFrom, which it
// offers too: the registry loads through it (one host copy per chunk).
type fillCounter struct{ *writeCounter }

func (w fillCounter) WriteFrom(ctx context.Context, r arena.Region, off uint64, src io.ReaderAt, srcOff, n int64) error {
	if w.count(true, int(n)) {
		return errWrite
	}
	return w.Memory.(fillMemory).WriteFrom(ctx, r, off, src, srcOff, n)
}

// loadPaths are the two ways the registry streams a tensor into device
// memory: the arena's WriteFrom (the mapped file read straight into the
// staging buffer) and, for memory without it, a buffer and Write.
var loadPaths = []struct {
	name string
	wrap func(*writeCounter) Memory
}{
	{"write-from", func(w *writeCounter) Memory { return fillCounter{w} }},
	{"buffer+write", func(w *writeCounter) Memory { return w }},
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
		for _, path := range loadPaths {
			for _, file := range files {
				t.Run(da.name+"/"+path.name+"/"+filepath.Base(file), func(t *testing.T) {
					testDeviceArena(t, da.new(t), path.wrap, file)
				})
			}
		}
	}
}

func testDeviceArena(t *testing.T, a *arena.Arena, wrap func(*writeCounter) Memory, file string) {
	if a.Mapped() {
		t.Fatal("the device arena says the host maps it")
	}
	mem := &writeCounter{Memory: a}
	reg := New(wrap(mem), quiet())
	m, err := reg.Load(t.Context(), "m", file)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := wrap(mem).(fillMemory); ok {
		// One WriteFrom per non-empty tensor, straight from the
		// file; the registry's buffer and Write are not used.
		want := 0
		for _, tn := range m.Tensors {
			if tn.NBytes > 0 {
				want++
			}
		}
		if mem.fills != want || mem.writes != 0 {
			t.Fatalf("%d WriteFrom and %d Write calls for %d tensors: want %d WriteFrom, no Write",
				mem.fills, mem.writes, len(m.Tensors), want)
		}
	} else {
		want := 0 // one write per chunk of each non-empty tensor
		for _, tn := range m.Tensors {
			want += int((tn.NBytes + uint64(copyChunk) - 1) / uint64(copyChunk))
		}
		if mem.largest > copyChunk || mem.writes != want || mem.fills != 0 {
			t.Fatalf("%d writes for %d tensors, the largest %d bytes: want %d, none over %d bytes",
				mem.writes, len(m.Tensors), mem.largest, want, copyChunk)
		}
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
		if got := tn.LoadCRC(); got != crc32.Checksum(want, castagnoli) {
			t.Errorf("%s: load CRC-32C %08x, the file's bytes %08x", tn.Name, got, crc32.Checksum(want, castagnoli))
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
}

// TestDeviceLoadRollsBack: a load that fails part way (a truncated file, a
// file truncated under the loader while it streams, an upload error,
// cancellation) fails with an error naming the file (and the tensor where
// one is at fault) and leaves nothing allocated on the device and no model,
// on both load paths.
func TestDeviceLoadRollsBack(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ckpt.safetensors")
	writeCheckpoint(t, path, checkpointSpec{rows: 512, cols: 256, weights: 8, blocksize: 64, nested: true, seed: 3})
	truncated := filepath.Join(dir, "truncated.safetensors")
	raw := readFile(t, path)
	if err := os.WriteFile(truncated, raw[:len(raw)-1000], 0o644); err != nil {
		t.Fatal(err)
	}
	// The tensor the loader is on when the file shrinks under it: the
	// fifth it allocates (tensors in data order, empty ones have none).
	const truncateAt = 5
	src, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var stored []string
	for _, ti := range src.Tensors {
		if ti.End > ti.Begin {
			stored = append(stored, ti.Name)
		}
	}
	src.Close()
	defer func(c int) { copyChunk = c }(copyChunk)
	copyChunk = 8192

	for _, da := range deviceArenas {
		for _, lp := range loadPaths {
			tests := []struct {
				name       string
				file       string
				failAt     int
				cancel     bool
				truncateAt int // truncate a copy of the file to 0 bytes before this Alloc
				want       []string
			}{
				{"truncated file", truncated, 0, false, 0, []string{"truncated"}},
				{"truncated under the loader", path, 0, false, truncateAt,
					[]string{"tensor " + stored[truncateAt-1] + ":", "truncated while open"}},
				{"upload fails late", path, 20, false, 0, []string{errWrite.Error()}},
				{"cancelled", path, 0, true, 0, []string{context.Canceled.Error()}},
			}
			for _, tc := range tests {
				t.Run(da.name+"/"+lp.name+"/"+tc.name, func(t *testing.T) {
					a := da.new(t)
					mem := &writeCounter{Memory: a, failAt: tc.failAt}
					file := tc.file
					if tc.truncateAt > 0 {
						file = filepath.Join(t.TempDir(), "shrinks.safetensors")
						if err := os.WriteFile(file, raw, 0o644); err != nil {
							t.Fatal(err)
						}
						mem.onAlloc = func(n int) {
							if n == tc.truncateAt {
								if err := os.Truncate(file, 0); err != nil {
									t.Error(err)
								}
							}
						}
					}
					ctx := t.Context()
					if tc.cancel {
						var cancel context.CancelFunc
						ctx, cancel = context.WithCancel(ctx)
						cancel()
					}
					reg := New(lp.wrap(mem), quiet())
					_, err := reg.Load(ctx, "m", file)
					t.Logf("load: %v", err)
					if err == nil || !strings.Contains(err.Error(), file) {
						t.Fatalf("load: %v, want an error naming %s", err, file)
					}
					for _, w := range tc.want {
						if !strings.Contains(err.Error(), w) {
							t.Fatalf("load: %v, want an error saying %q", err, w)
						}
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
}
