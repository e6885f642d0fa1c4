package cuda

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
)

// fakeAlloc is a device allocator without a device: it hands out
// increasing addresses and distinct handles and records every alloc and
// free, so tests can check that no slab is freed twice, none leaks, and
// none is freed while a holder has it open.
type fakeAlloc struct {
	mu      sync.Mutex
	next    DevicePtr
	live    map[DevicePtr]Slab
	allocs  int
	frees   []DevicePtr
	failNth int // fail the failNth Alloc (1-based) when non-zero
	freeErr error

	// Mover (mover_test.go)
	mem       map[DevicePtr][]byte // slab base → its bytes, made on first use
	queued    [][3]uint64          // dst, src, n of copies not yet synced
	uploads   []int                // sizes of the uploads
	uploadSrc []*byte              // the first byte of each upload's source
	syncs     int
	uploadErr error
}

func newFakeAlloc() *fakeAlloc { return &fakeAlloc{next: 1 << 32, live: map[DevicePtr]Slab{}} }

func (f *fakeAlloc) Device() int { return 3 }

func (f *fakeAlloc) Alloc(size uint64) (Slab, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.allocs++
	if f.failNth != 0 && f.allocs == f.failNth {
		return Slab{}, errors.New("cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY")
	}
	s := Slab{Ptr: f.next, Size: size}
	for i := range s.Handle {
		s.Handle[i] = byte(uint64(f.next)>>(8*(i%8))) ^ byte(i)
	}
	f.next += DevicePtr((size + 1<<21 - 1) &^ (1<<21 - 1))
	f.live[s.Ptr] = s
	return s, nil
}

func (f *fakeAlloc) Free(s Slab) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.live[s.Ptr]; !ok {
		return fmt.Errorf("cuMemFree %#x: not allocated (double free)", s.Ptr)
	}
	delete(f.live, s.Ptr)
	delete(f.mem, s.Ptr)
	f.frees = append(f.frees, s.Ptr)
	return f.freeErr
}

func (f *fakeAlloc) liveCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.live)
}

// TestConformance runs the arena conformance suite on the CUDA backend
// over the fake allocator, checking after each subtest that every slab
// went back to the allocator.
func TestConformance(t *testing.T) {
	arenatest.Run(t, func(t *testing.T) arena.Backend {
		f := newFakeAlloc()
		t.Cleanup(func() {
			if n := f.liveCount(); n != 0 {
				t.Errorf("%d slabs still allocated after the arena closed", n)
			}
		})
		return NewBackend(f, nil)
	})
}

func newArena(t *testing.T, f *fakeAlloc) (*arena.Arena, *Backend) {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	b := NewBackend(f, log)
	a, err := arena.New(t.Context(), b, arena.Config{Capacity: 1 << 30, SegmentSize: 1 << 20, RetainEmpty: true, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

// TestSlabHeldByPlugin: the arena closes a slab a live plugin generation
// has open; the free waits for that generation's release, and happens once.
func TestSlabHeldByPlugin(t *testing.T) {
	f := newFakeAlloc()
	a, b := newArena(t, f)
	gen1, gen2 := arena.PluginOwner("lora-nf4", 1), arena.PluginOwner("lora-nf4", 2)
	r, err := a.Alloc(arena.HostOwner, "w", 4096)
	if err != nil {
		t.Fatal(err)
	}
	loc, err := a.Location(r)
	if err != nil {
		t.Fatal(err)
	}
	if loc.Kind != arena.KindCUDA || len(loc.IPCHandle) != HandleSize || loc.Device != 3 {
		t.Fatalf("location %+v", loc)
	}
	for _, g := range []arena.Owner{gen1, gen2, gen1} {
		if err := b.Opened(g, r.Segment); err != nil {
			t.Fatal(err)
		}
	}
	if got := b.Holders(r.Segment); len(got) != 2 || got[0] != gen1 || got[1] != gen2 {
		t.Fatalf("holders %v", got)
	}
	if err := a.Free(r); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err == nil || !strings.Contains(err.Error(), "still open") {
		// The arena closes segments (deferred here), then the backend, which
		// reports the slabs left allocated for live holders.
		t.Fatalf("arena close: %v, want the backend's still-open error", err)
	}
	if f.liveCount() != 1 || len(f.frees) != 0 {
		t.Fatalf("slab freed while open: live %d frees %v", f.liveCount(), f.frees)
	}
	if p := b.Pending(); len(p) != 1 || p[0] != r.Segment {
		t.Fatalf("pending %v", p)
	}
	if err := b.Opened(gen2, r.Segment); err == nil {
		t.Fatal("a closing slab was handed out again")
	}
	if err := b.Released(gen1, r.Segment); err != nil {
		t.Fatal(err)
	}
	if f.liveCount() != 1 {
		t.Fatal("freed while gen2 still holds it")
	}
	if err := b.Released(gen2); err != nil { // gen2's process exited
		t.Fatal(err)
	}
	if f.liveCount() != 0 || len(f.frees) != 1 || len(b.Pending()) != 0 {
		t.Fatalf("after the last release: live %d frees %v pending %v", f.liveCount(), f.frees, b.Pending())
	}
	if err := b.Released(gen2); err != nil {
		t.Fatalf("second release: %v", err)
	}
}

// TestSlabReleasedBeforeClose: a holder that released in time does not
// delay the free.
func TestSlabReleasedBeforeClose(t *testing.T) {
	f := newFakeAlloc()
	a, b := newArena(t, f)
	g := arena.PluginOwner("p", 7)
	r, err := a.Alloc(arena.HostOwner, "w", 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Opened(g, r.Segment); err != nil {
		t.Fatal(err)
	}
	if err := b.Released(g); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if f.liveCount() != 0 || len(f.frees) != 1 {
		t.Fatalf("live %d frees %v", f.liveCount(), f.frees)
	}
}

func TestBackendErrors(t *testing.T) {
	f := newFakeAlloc()
	f.failNth = 1
	b := NewBackend(f, nil)
	if _, err := b.Create(1, 1<<20); err == nil || !strings.Contains(err.Error(), "slab 1 of 1048576 bytes on device 3") {
		t.Fatalf("create: %v", err)
	}
	if err := b.Opened("plugin:x#1", 9); err == nil || !strings.Contains(err.Error(), "no such slab") {
		t.Fatalf("open unknown: %v", err)
	}
	if _, err := b.Ptr(9); err == nil {
		t.Fatal("ptr of an unknown slab")
	}
	s, err := b.Create(2, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Create(2, 1<<20); err == nil {
		t.Fatal("duplicate id accepted")
	}
	if p, err := b.Ptr(2); err != nil || p != 1<<32 {
		t.Fatalf("ptr %#x %v", p, err)
	}
	f.freeErr = errors.New("cuMemFree: CUDA_ERROR_ILLEGAL_ADDRESS")
	if err := s.Close(); err == nil || !strings.Contains(err.Error(), "free slab 2") {
		t.Fatalf("close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Create(3, 1<<20); err == nil {
		t.Fatal("create after close")
	}
}

func TestNewArenaRetainsEmpty(t *testing.T) {
	f := newFakeAlloc()
	a, b, err := NewArena(t.Context(), f, arena.Config{Capacity: 8 << 20, SegmentSize: 1 << 20, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	r1, err := a.Alloc(arena.HostOwner, "a", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := a.Alloc(arena.HostOwner, "b", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Free(r1); err != nil {
		t.Fatal(err)
	}
	if err := a.Free(r2); err != nil {
		t.Fatal(err)
	}
	if n := f.liveCount(); n != 2 || len(f.frees) != 0 {
		t.Fatalf("empty slabs returned before Close: live %d frees %d", n, len(f.frees))
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if f.liveCount() != 0 || len(b.Pending()) != 0 {
		t.Fatalf("after close: live %d pending %v", f.liveCount(), b.Pending())
	}
	if _, _, err := NewArena(t.Context(), f, arena.Config{}); err == nil || !strings.Contains(err.Error(), "device 3") {
		t.Fatalf("zero capacity: %v", err)
	}
}
