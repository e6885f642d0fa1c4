// Package arenatest is the conformance suite every arena backend passes:
// the CPU shared-memory backend in both modes, the fake device backend
// (FakeDevice) here, and the CUDA backend behind the cuda build tag. Run
// drives an arena.Arena on a fresh backend per subtest and checks
// alignment, coalescing, best fit, growth, capacity errors, stale
// generations, leases (ReleaseOwner, Transfer), stats and fragmentation,
// the pages freed ranges give back (arena.Discarder),
// backend failures, concurrency (run it with -race) and leaks: every
// segment a backend created is closed by the time the arena is closed.
package arenatest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

const kib = 1024

// Run runs the suite. newBackend makes a fresh backend for each subtest;
// it may register t.Cleanup checks of its own (files removed, fds closed),
// which run after the arena and the backend are closed.
func Run(t *testing.T, newBackend func(t *testing.T) arena.Backend) {
	tests := []struct {
		name string
		fn   func(t *testing.T, h *harness)
	}{
		{"Alignment", testAlignment},
		{"BadInput", testBadInput},
		{"Coalescing", testCoalescing},
		{"BestFit", testBestFit},
		{"Growth", testGrowth},
		{"RetainEmpty", testRetainEmpty},
		{"Capacity", testCapacity},
		{"SpareMakesRoom", testSpareMakesRoom},
		{"Stale", testStale},
		{"ReleaseOwner", testReleaseOwner},
		{"Transfer", testTransfer},
		{"Leases", testLeases},
		{"Stats", testStats},
		{"BackendFailure", testBackendFailure},
		{"Concurrency", testConcurrency},
		{"Close", testClose},
		{"Move", testMove},
		{"WriteFrom", testWriteFrom},
		{"Discard", testDiscard},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, &harness{t: t, newBackend: newBackend})
		})
	}
}

// harness makes arenas on counted backends and checks for leaks.
type harness struct {
	t          *testing.T
	newBackend func(t *testing.T) arena.Backend
	backend    *countingBackend
}

// arena makes an arena with 64 KiB segments and the given capacity.
func (h *harness) arena(capacity uint64, opts ...func(*arena.Config)) *arena.Arena {
	h.t.Helper()
	cfg := arena.Config{Capacity: capacity, SegmentSize: 64 * kib, Logger: testLogger(h.t)}
	for _, o := range opts {
		o(&cfg)
	}
	h.backend = &countingBackend{inner: h.newBackend(h.t)}
	a, err := arena.New(h.t.Context(), h.backend, cfg)
	if err != nil {
		h.t.Fatalf("new arena on %s: %v", h.backend.Name(), err)
	}
	b := h.backend
	h.t.Cleanup(func() {
		if err := a.Close(); err != nil {
			h.t.Errorf("close arena: %v", err)
		}
		b.checkLeaks(h.t)
	})
	return a
}

func retainEmpty(c *arena.Config) { c.RetainEmpty = true }

// hostView reports whether the arena's backend maps memory into the host,
// and checks that Bytes and Location agree about it.
func hostView(t *testing.T, a *arena.Arena, r arena.Region) ([]byte, bool) {
	t.Helper()
	b, err := a.Bytes(r)
	loc, lerr := a.Location(r)
	if lerr != nil {
		t.Fatalf("location of %v: %v", r, lerr)
	}
	switch {
	case err == nil:
		if uint64(len(b)) != r.Length || uint64(cap(b)) != r.Length {
			t.Fatalf("bytes of %v: len %d cap %d, want both %d", r, len(b), cap(b), r.Length)
		}
		if loc.Kind != arena.KindCPU {
			t.Fatalf("bytes of %v: host view on a %q location", r, loc.Kind)
		}
		return b, true
	case errors.Is(err, arena.ErrNoHostView):
		if loc.Kind == arena.KindCPU {
			t.Fatalf("bytes of %v: %v, but its location is %q", r, err, loc.Kind)
		}
		return nil, false
	default:
		t.Fatalf("bytes of %v: %v", r, err)
		return nil, false
	}
}

func mustAlloc(t *testing.T, a *arena.Arena, owner arena.Owner, name string, n uint64) arena.Region {
	t.Helper()
	r, err := a.Alloc(owner, name, n)
	if err != nil {
		t.Fatalf("alloc %q (%d bytes) for %s: %v", name, n, owner, err)
	}
	return r
}

func mustFree(t *testing.T, a *arena.Arena, r arena.Region) {
	t.Helper()
	if err := a.Free(r); err != nil {
		t.Fatalf("free %v: %v", r, err)
	}
}

func testAlignment(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	sizes := []uint64{1, 255, 256, 257, 1000, 4096, 4097, 65535, 65536, 70000}
	var regions []arena.Region
	var lastGen uint64
	for _, n := range sizes {
		r := mustAlloc(t, a, arena.HostOwner, fmt.Sprintf("t%d", n), n)
		if r.Offset%arena.Alignment != 0 {
			t.Errorf("alloc %d: offset %d not %d-aligned", n, r.Offset, arena.Alignment)
		}
		if r.Length != n {
			t.Errorf("alloc %d: length %d", n, r.Length)
		}
		if r.Segment == 0 || r.Generation <= lastGen {
			t.Errorf("alloc %d: segment %d generation %d after generation %d", n, r.Segment, r.Generation, lastGen)
		}
		lastGen = r.Generation
		loc, err := a.Location(r)
		if err != nil {
			t.Fatalf("location of %v: %v", r, err)
		}
		if loc.SegmentID != r.Segment || loc.Size < r.Offset+r.Length || loc.Size%arena.PageSize != 0 {
			t.Errorf("location of %v: segment %d size %d", r, loc.SegmentID, loc.Size)
		}
		switch loc.Kind {
		case arena.KindCPU:
			if loc.Path == "" || loc.HostPID == 0 {
				t.Errorf("cpu location of %v: path %q pid %d", r, loc.Path, loc.HostPID)
			}
		case arena.KindCUDA:
			if len(loc.IPCHandle) != 64 {
				t.Errorf("cuda location of %v: %d-byte IPC handle, want 64", r, len(loc.IPCHandle))
			}
		default:
			t.Errorf("location of %v: kind %q", r, loc.Kind)
		}
		regions = append(regions, r)
	}
	// No two aligned extents overlap.
	for i, r := range regions {
		for _, q := range regions[i+1:] {
			if r.Segment == q.Segment && r.Offset < q.Offset+align(q.Length) && q.Offset < r.Offset+align(r.Length) {
				t.Errorf("regions overlap: %v and %v", r, q)
			}
		}
	}
	// Host views: fresh memory is zero, and writes land where expected.
	for i, r := range regions {
		b, ok := hostView(t, a, r)
		if !ok {
			continue
		}
		for j, c := range b {
			if c != 0 {
				t.Fatalf("fresh region %v: byte %d is %#x, want 0", r, j, c)
			}
		}
		for j := range b {
			b[j] = byte(i + 1)
		}
	}
	for i, r := range regions {
		if b, ok := hostView(t, a, r); ok {
			for j, c := range b {
				if c != byte(i+1) {
					t.Fatalf("region %v: byte %d is %#x, want %#x (overwritten by a neighbour)", r, j, c, i+1)
				}
			}
		}
	}
	// Location hands out copies.
	loc, _ := a.Location(regions[0])
	if len(loc.IPCHandle) > 0 {
		loc.IPCHandle[0] ^= 0xff
		again, _ := a.Location(regions[0])
		if again.IPCHandle[0] == loc.IPCHandle[0] {
			t.Error("Location returned the arena's own IPC handle slice")
		}
	}
}

func align(n uint64) uint64 { return (n + arena.Alignment - 1) / arena.Alignment * arena.Alignment }

func testBadInput(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	live := mustAlloc(t, a, arena.HostOwner, "live", 1000)
	before := a.Stats()
	tests := []struct {
		name string
		op   func() error
		want error
	}{
		{"alloc zero", func() error { _, err := a.Alloc(arena.HostOwner, "zero", 0); return err }, arena.ErrInvalid},
		{"alloc empty owner", func() error { _, err := a.Alloc("", "x", 10); return err }, arena.ErrInvalid},
		{"alloc spaced owner", func() error { _, err := a.Alloc(" host", "x", 10); return err }, arena.ErrInvalid},
		{"check zero region", func() error { return a.Check(arena.Region{}) }, arena.ErrInvalid},
		{"check unknown segment", func() error {
			return a.Check(arena.Region{Segment: 999, Offset: 0, Length: 1, Generation: live.Generation})
		}, arena.ErrInvalid},
		{"check zero length", func() error { r := live; r.Length = 0; return a.Check(r) }, arena.ErrInvalid},
		{"check past region end", func() error { r := live; r.Length++; return a.Check(r) }, arena.ErrInvalid},
		{"check range past end", func() error {
			return a.Check(arena.Region{Segment: live.Segment, Offset: live.Offset + 512, Length: 1000, Generation: live.Generation})
		}, arena.ErrInvalid},
		{"check huge range", func() error {
			return a.Check(arena.Region{Segment: live.Segment, Offset: live.Offset, Length: math.MaxUint64, Generation: live.Generation})
		}, arena.ErrInvalid},
		{"free sub-range", func() error { r := live; r.Length = 10; return a.Free(r) }, arena.ErrInvalid},
		{"free inside region", func() error { r := live; r.Offset += 256; r.Length = 10; return a.Free(r) }, arena.ErrStale},
		{"free wrong generation", func() error { r := live; r.Generation++; return a.Free(r) }, arena.ErrStale},
		{"bytes wrong generation", func() error { r := live; r.Generation--; _, err := a.Bytes(r); return err }, arena.ErrStale},
		{"transfer to empty owner", func() error { _, err := a.Transfer(live, ""); return err }, arena.ErrInvalid},
		{"free unallocated offset", func() error {
			return a.Free(arena.Region{Segment: live.Segment, Offset: live.Offset + 4096, Length: 1, Generation: live.Generation})
		}, arena.ErrStale},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.op()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if len(err.Error()) < len(tc.want.Error())+20 {
				t.Errorf("error %q says nothing beyond the sentinel", err)
			}
			if after := a.Stats(); after != before {
				t.Errorf("state changed:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
	if err := a.Check(live); err != nil {
		t.Errorf("live region after bad input: %v", err)
	}
	// A range inside a live region is a valid descriptor.
	if err := a.Check(arena.Region{Segment: live.Segment, Offset: live.Offset + 256, Length: 744, Generation: live.Generation}); err != nil {
		t.Errorf("check sub-range: %v", err)
	}
}

// permutations returns every order of 0..n-1.
func permutations(n int) [][]int {
	if n == 1 {
		return [][]int{{0}}
	}
	var out [][]int
	for _, p := range permutations(n - 1) {
		for i := 0; i <= len(p); i++ {
			q := append(append(append([]int{}, p[:i]...), n-1), p[i:]...)
			out = append(out, q)
		}
	}
	return out
}

func testCoalescing(t *testing.T, h *harness) {
	// Every order of freeing four quarters of a segment must leave one
	// extent the size of the segment.
	a := h.arena(64*kib, retainEmpty)
	for _, order := range permutations(4) {
		var q [4]arena.Region
		for i := range q {
			q[i] = mustAlloc(t, a, arena.HostOwner, "quarter", 16*kib)
		}
		if st := a.Stats(); st.Free != 0 || st.Segments != 1 {
			t.Fatalf("four quarters: free %d in %d segments, want 0 in 1", st.Free, st.Segments)
		}
		for i, k := range order {
			mustFree(t, a, q[k])
			st := a.Stats()
			if st.Free != arena.ByteSize(16*kib*(i+1)) {
				t.Fatalf("order %v step %d: free %d", order, i, st.Free)
			}
			want := largestRun(order[:i+1]) * 16 * kib
			if uint64(st.LargestFree) != want {
				t.Fatalf("order %v step %d: largest free %d, want %d", order, i, st.LargestFree, want)
			}
			wantFrag := 1 - float64(want)/float64(st.Free)
			if math.Abs(st.Fragmentation-wantFrag) > 1e-12 {
				t.Fatalf("order %v step %d: fragmentation %v, want %v", order, i, st.Fragmentation, wantFrag)
			}
		}
		whole := mustAlloc(t, a, arena.HostOwner, "whole", 64*kib)
		if whole.Offset != 0 || whole.Segment != q[0].Segment {
			t.Fatalf("order %v: whole-segment alloc at %v, want offset 0 of segment %d", order, whole, q[0].Segment)
		}
		mustFree(t, a, whole)
	}
}

// largestRun returns the longest run of adjacent quarters among freed.
func largestRun(freed []int) uint64 {
	var set [4]bool
	for _, k := range freed {
		set[k] = true
	}
	best, run := 0, 0
	for _, f := range set {
		if f {
			run++
			best = max(best, run)
		} else {
			run = 0
		}
	}
	return uint64(best)
}

func testBestFit(t *testing.T, h *harness) {
	a := h.arena(64*kib, retainEmpty)
	// Holes of 8, 2 and 4 KiB separated by pinned 1 KiB regions.
	holes := map[uint64]arena.Region{}
	for _, n := range []uint64{8 * kib, 2 * kib, 4 * kib} {
		holes[n] = mustAlloc(t, a, arena.HostOwner, "hole", n)
		mustAlloc(t, a, arena.HostOwner, "pin", kib)
	}
	for _, r := range holes {
		mustFree(t, a, r)
	}
	tests := []struct {
		n    uint64
		hole uint64
	}{
		{2 * kib, 2 * kib}, // exact fit, not the first (8 KiB) hole
		{3 * kib, 4 * kib}, // the smallest hole that fits
		{5 * kib, 8 * kib},
	}
	for _, tc := range tests {
		r := mustAlloc(t, a, arena.HostOwner, "fit", tc.n)
		if r.Offset != holes[tc.hole].Offset {
			t.Errorf("alloc %d: offset %d, want the %d-byte hole at %d", tc.n, r.Offset, tc.hole, holes[tc.hole].Offset)
		}
	}
}

func testGrowth(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	var rs []arena.Region
	for i := range 3 {
		r := mustAlloc(t, a, arena.HostOwner, "big", 48*kib)
		rs = append(rs, r)
		if st := a.Stats(); st.Segments != i+1 || st.Reserved != arena.ByteSize(64*kib*(i+1)) {
			t.Fatalf("after %d allocs of 48 KiB: %d segments, %d reserved", i+1, st.Segments, st.Reserved)
		}
	}
	// A request larger than the growth unit gets its own segment, rounded
	// up to a page.
	big := mustAlloc(t, a, arena.HostOwner, "oversize", 100*kib+1)
	loc, err := a.Location(big)
	if err != nil {
		t.Fatal(err)
	}
	if loc.Size != 104*kib || big.Offset != 0 {
		t.Errorf("oversize alloc: segment of %d bytes at offset %d, want 106496 at 0", loc.Size, big.Offset)
	}
	// Small requests still fit the holes of standard segments.
	small := mustAlloc(t, a, arena.HostOwner, "small", 16*kib)
	if small.Segment != rs[0].Segment {
		t.Errorf("16 KiB alloc went to segment %d, want the hole in segment %d", small.Segment, rs[0].Segment)
	}
	mustFree(t, a, big)
	if st := a.Stats(); st.Segments != 3 || st.Reserved != 192*kib {
		t.Errorf("after freeing the oversize region: %d segments, %d reserved; want its segment released", st.Segments, st.Reserved)
	}
	for _, r := range append(rs, small) {
		mustFree(t, a, r)
	}
	// One standard segment stays as a spare; the other empties go back.
	if st := a.Stats(); st.Segments != 1 || st.Reserved != 64*kib || st.Free != 64*kib || st.Fragmentation != 0 {
		t.Errorf("all freed: %+v; want one empty 64 KiB segment", st)
	}
	if live := h.backend.live(); live != 1 {
		t.Errorf("backend holds %d live segments, want 1", live)
	}
}

func testRetainEmpty(t *testing.T, h *harness) {
	a := h.arena(1<<20, retainEmpty)
	var rs []arena.Region
	for range 3 {
		rs = append(rs, mustAlloc(t, a, arena.HostOwner, "big", 48*kib))
	}
	rs = append(rs, mustAlloc(t, a, arena.HostOwner, "oversize", 100*kib))
	for _, r := range rs {
		mustFree(t, a, r)
	}
	if st := a.Stats(); st.Segments != 4 || st.Reserved != 292*kib || st.Allocated != 0 {
		t.Errorf("retain empty: %+v; want all 4 segments kept", st)
	}
	// Kept segments are reused: no growth for the same requests.
	for range 3 {
		mustAlloc(t, a, arena.HostOwner, "again", 48*kib)
	}
	if got := h.backend.created(); got != 4 {
		t.Errorf("backend created %d segments, want 4 (reuse)", got)
	}
}

func testCapacity(t *testing.T, h *harness) {
	a := h.arena(128 * kib)
	r1 := mustAlloc(t, a, arena.HostOwner, "first", 60*kib)
	r2 := mustAlloc(t, a, arena.HostOwner, "second", 60*kib)
	if r1.Segment == r2.Segment {
		t.Fatalf("two 60 KiB regions in one 64 KiB segment: %v %v", r1, r2)
	}
	before := a.Stats()
	owner := arena.PluginOwner("lora-nf4", 3)
	tests := []struct {
		name                    string
		n                       uint64
		free, largest, maxAlloc arena.ByteSize
	}{
		{"just over", 4*kib + 1, 8 * kib, 4 * kib, 4 * kib},
		{"a segment", 64 * kib, 8 * kib, 4 * kib, 4 * kib},
		{"huge", 1 << 62, 8 * kib, 4 * kib, 4 * kib},
		{"max uint64", math.MaxUint64, 8 * kib, 4 * kib, 4 * kib},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := a.Alloc(owner, "factors", tc.n)
			if !errors.Is(err, arena.ErrCapacity) {
				t.Fatalf("alloc %d bytes: %v, want ErrCapacity", tc.n, err)
			}
			var ce *arena.CapacityError
			if !errors.As(err, &ce) {
				t.Fatalf("alloc %d bytes: %T is not a *CapacityError", tc.n, err)
			}
			if uint64(ce.Requested) != tc.n || ce.Free != tc.free || ce.LargestFree != tc.largest || ce.MaxAlloc != tc.maxAlloc ||
				ce.Capacity != 128*kib || ce.Allocated != 120*kib || ce.Headroom != 0 || ce.Owner != owner {
				t.Errorf("capacity error figures: %+v", *ce)
			}
			msg := err.Error()
			for _, want := range []string{
				fmt.Sprintf("%d bytes", tc.n), "factors", string(owner), "capacity 128.0 KiB",
				"allocated 120.0 KiB", "free 8.0 KiB", "largest free extent 4.0 KiB", "largest possible allocation 4.0 KiB",
			} {
				if !strings.Contains(msg, want) {
					t.Errorf("capacity error %q does not say %q", msg, want)
				}
			}
			if after := a.Stats(); after != before {
				t.Errorf("failed alloc changed state:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
	// What the error called possible is possible.
	mustAlloc(t, a, owner, "fits", 4*kib)
}

func testSpareMakesRoom(t *testing.T, h *harness) {
	// Capacity 128 KiB: the empty first segment (64 KiB) must give way
	// for a 100 KiB request that only fits once it is released.
	a := h.arena(128 * kib)
	r := mustAlloc(t, a, arena.HostOwner, "big", 100*kib)
	if st := a.Stats(); st.Segments != 1 || st.Reserved != 100*kib {
		t.Fatalf("after 100 KiB alloc: %+v; want the spare released and one 100 KiB segment", st)
	}
	mustFree(t, a, r)
}

func testStale(t *testing.T, h *harness) {
	a := h.arena(1<<20, retainEmpty)
	r := mustAlloc(t, a, arena.HostOwner, "r", 1000)
	mustFree(t, a, r)
	r2 := mustAlloc(t, a, arena.HostOwner, "r2", 1000)
	if r2.Segment != r.Segment || r2.Offset != r.Offset {
		t.Fatalf("reuse: got %v, want the place of %v", r2, r)
	}
	if r2.Generation <= r.Generation {
		t.Fatalf("reuse: generation %d not after %d", r2.Generation, r.Generation)
	}
	ops := []struct {
		name string
		op   func(arena.Region) error
	}{
		{"check", a.Check},
		{"free", a.Free},
		{"bytes", func(r arena.Region) error { _, err := a.Bytes(r); return err }},
		{"location", func(r arena.Region) error { _, err := a.Location(r); return err }},
		{"transfer", func(r arena.Region) error { _, err := a.Transfer(r, "plugin:x#1"); return err }},
	}
	for _, op := range ops {
		t.Run(op.name, func(t *testing.T) {
			err := op.op(r)
			if !errors.Is(err, arena.ErrStale) {
				t.Fatalf("%s of a reused region: %v, want ErrStale", op.name, err)
			}
			if !strings.Contains(err.Error(), fmt.Sprint(r2.Generation)) {
				t.Errorf("error %q does not name the live generation %d", err, r2.Generation)
			}
			if err := a.Check(r2); err != nil {
				t.Errorf("the live region after a stale %s: %v", op.name, err)
			}
		})
	}
	mustFree(t, a, r2)
	if err := a.Free(r2); !errors.Is(err, arena.ErrStale) {
		t.Errorf("double free: %v, want ErrStale", err)
	}
}

func testReleaseOwner(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	p1, p2 := arena.PluginOwner("lora-nf4", 1), arena.PluginOwner("lora-nf4", 2)
	if p1 != "plugin:lora-nf4#1" {
		t.Fatalf("PluginOwner = %q", p1)
	}
	var p1Regions, others []arena.Region
	var p1Bytes uint64
	for _, n := range []uint64{1, 300, 4096, 20000, 70000} {
		p1Regions = append(p1Regions, mustAlloc(t, a, p1, "factor", n))
		p1Bytes += align(n)
		others = append(others, mustAlloc(t, a, arena.HostOwner, "weight", n), mustAlloc(t, a, p2, "factor", n))
	}
	if got := a.Owned(p1); uint64(got) != p1Bytes {
		t.Fatalf("owned by %s: %d, want %d", p1, got, p1Bytes)
	}
	if st := a.Stats(); st.Owners != 3 || st.Regions != 15 {
		t.Fatalf("stats: %d owners %d regions", st.Owners, st.Regions)
	}
	n, bytes := a.ReleaseOwner(p1)
	if n != len(p1Regions) || uint64(bytes) != p1Bytes {
		t.Fatalf("release %s: %d regions, %d bytes; want %d, %d", p1, n, bytes, len(p1Regions), p1Bytes)
	}
	if got := a.Owned(p1); got != 0 {
		t.Errorf("owned by %s after release: %d", p1, got)
	}
	for _, r := range p1Regions {
		if err := a.Check(r); !errors.Is(err, arena.ErrStale) {
			t.Errorf("released region %v: %v, want ErrStale", r, err)
		}
	}
	for _, r := range others {
		if err := a.Check(r); err != nil {
			t.Errorf("other owners' region %v: %v", r, err)
		}
	}
	if n, bytes := a.ReleaseOwner(p1); n != 0 || bytes != 0 {
		t.Errorf("second release: %d regions %d bytes", n, bytes)
	}
	if st := a.Stats(); st.Owners != 2 || st.Regions != 10 {
		t.Errorf("stats after release: %d owners %d regions", st.Owners, st.Regions)
	}
	a.ReleaseOwner(p2)
	a.ReleaseOwner(arena.HostOwner)
	if st := a.Stats(); st.Allocated != 0 || st.Requested != 0 || st.Regions != 0 || st.Owners != 0 || st.Fragmentation != 0 {
		t.Errorf("all released: %+v", st)
	}
}

func testTransfer(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	p := arena.PluginOwner("lora-nf4", 7)
	r := mustAlloc(t, a, p, "A_cat", 5000)
	if b, ok := hostView(t, a, r); ok {
		copy(b, "factors")
	}
	bound, err := a.Transfer(r, arena.HostOwner)
	if err != nil {
		t.Fatalf("transfer: %v", err)
	}
	if bound.Segment != r.Segment || bound.Offset != r.Offset || bound.Length != r.Length || bound.Generation <= r.Generation {
		t.Fatalf("transfer of %v gave %v: want the same place with a newer generation", r, bound)
	}
	if err := a.Check(r); !errors.Is(err, arena.ErrStale) {
		t.Errorf("the plugin's descriptor after transfer: %v, want ErrStale", err)
	}
	if a.Owned(p) != 0 || a.Owned(arena.HostOwner) != arena.ByteSize(align(5000)) {
		t.Errorf("owned after transfer: plugin %d host %d", a.Owned(p), a.Owned(arena.HostOwner))
	}
	if n, _ := a.ReleaseOwner(p); n != 0 {
		t.Errorf("the plugin's restart reclaimed %d regions, want 0", n)
	}
	if err := a.Check(bound); err != nil {
		t.Errorf("bound factors after the plugin's restart: %v", err)
	}
	if b, ok := hostView(t, a, bound); ok && string(b[:7]) != "factors" {
		t.Errorf("transferred bytes: %q", b[:7])
	}
	mustFree(t, a, bound)
}

func testLeases(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	p := arena.PluginOwner("lora-nf4", 2)
	w := mustAlloc(t, a, arena.HostOwner, "double_blocks.0.img_attn.qkv.weight", 9000)
	f := mustAlloc(t, a, p, "A_cat", 300)
	big := mustAlloc(t, a, p, "B_cat", 100*kib) // its own segment
	before := a.Stats()
	// A plugin may not free the host's weights...
	if err := a.FreeOwned(p, w); !errors.Is(err, arena.ErrNotOwner) || !strings.Contains(err.Error(), "leased to host") {
		t.Fatalf("plugin frees the host's region: %v, want ErrNotOwner naming the owner", err)
	}
	if a.Stats() != before {
		t.Fatal("a refused FreeOwned changed state")
	}
	// ...nor a stale descriptor of its own.
	if err := a.FreeOwned(p, arena.Region{Segment: f.Segment, Offset: f.Offset, Length: f.Length, Generation: f.Generation + 100}); !errors.Is(err, arena.ErrStale) {
		t.Fatalf("FreeOwned of a stale descriptor: %v", err)
	}
	got, err := a.Lease(arena.Region{Segment: w.Segment, Offset: w.Offset + 512, Length: 10, Generation: w.Generation})
	if err != nil || got.Owner != arena.HostOwner || got.Name != "double_blocks.0.img_attn.qkv.weight" || got.Region != w || got.Size != 9216 {
		t.Fatalf("lease of a range inside the weight: %+v, %v", got, err)
	}
	all := a.Leases()
	if len(all) != 3 || all[0].Region != w || all[1].Region != f || all[2].Region != big || all[2].Owner != p {
		t.Fatalf("leases: %+v", all)
	}
	if err := a.FreeOwned(p, f); err != nil {
		t.Fatalf("plugin frees its own region: %v", err)
	}
	if err := a.FreeOwned(p, big); err != nil {
		t.Fatalf("plugin frees its own region: %v", err)
	}
	if all := a.Leases(); len(all) != 1 || all[0].Region != w {
		t.Fatalf("leases after frees: %+v", all)
	}
}

func testStats(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	st := a.Stats()
	if st.Backend != h.backend.Name() || st.Capacity != 1<<20 || st.Segments != 1 || st.Reserved != 64*kib ||
		st.Headroom != 1<<20-64*kib || st.Allocated != 0 || st.Peak != 0 || st.LargestFree != 64*kib {
		t.Fatalf("fresh arena: %+v", st)
	}
	r1 := mustAlloc(t, a, arena.HostOwner, "a", 1000)
	r2 := mustAlloc(t, a, arena.HostOwner, "b", 3000)
	st = a.Stats()
	if st.Allocated != 1024+3072 || st.Requested != 4000 || st.Peak != 4096 || st.Regions != 2 || st.Owners != 1 ||
		st.Free != 60*kib || st.LargestFree != 60*kib || st.Fragmentation != 0 {
		t.Fatalf("two regions: %+v", st)
	}
	mustFree(t, a, r1)
	st = a.Stats()
	if st.Allocated != 3072 || st.Peak != 4096 || st.Free != 61*kib || st.LargestFree != 60*kib {
		t.Fatalf("after a free: %+v", st)
	}
	if want := 1 - 60.0/61.0; math.Abs(st.Fragmentation-want) > 1e-12 {
		t.Errorf("fragmentation %v, want %v", st.Fragmentation, want)
	}
	var sb strings.Builder
	slog.New(slog.NewTextHandler(&sb, nil)).Info("stats", "arena", st)
	for _, want := range []string{"arena.allocated=\"3.0 KiB\"", "arena.peak=\"4.0 KiB\"", "arena.fragmentation=0.016", "arena.segments=1"} {
		if !strings.Contains(sb.String(), want) {
			t.Errorf("logged stats %q lack %q", sb.String(), want)
		}
	}
	mustFree(t, a, r2)
}

func testBackendFailure(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	r := mustAlloc(t, a, arena.HostOwner, "fills", 64*kib)
	before := a.Stats()
	h.backend.failNext(errors.New("injected: out of memory"))
	_, err := a.Alloc(arena.HostOwner, "grows", 1000)
	if err == nil || !strings.Contains(err.Error(), "injected: out of memory") || !strings.Contains(err.Error(), "grows") {
		t.Fatalf("alloc on a failing backend: %v", err)
	}
	if after := a.Stats(); after != before {
		t.Errorf("failed growth changed state:\nbefore %+v\nafter  %+v", before, after)
	}
	r2 := mustAlloc(t, a, arena.HostOwner, "grows", 1000)
	mustFree(t, a, r)
	mustFree(t, a, r2)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	// A backend whose first segment fails makes New fail and is closed.
	// (Subtests, so that newBackend's own cleanup checks run at their end.)
	t.Run("first segment", func(t *testing.T) {
		b := &countingBackend{inner: h.newBackend(t)}
		b.failNext(errors.New("injected: no memory at all"))
		if _, err := arena.New(context.Background(), b, arena.Config{Capacity: 1 << 20, Logger: testLogger(t)}); err == nil ||
			!strings.Contains(err.Error(), "injected") {
			t.Fatalf("new arena on a failing backend: %v", err)
		}
		b.checkLeaks(t)
	})
	// So is a backend given a bad config.
	t.Run("bad config", func(t *testing.T) {
		b := &countingBackend{inner: h.newBackend(t)}
		if _, err := arena.New(context.Background(), b, arena.Config{Capacity: 100}); !errors.Is(err, arena.ErrInvalid) {
			t.Fatalf("new arena with capacity 100: %v", err)
		}
		b.checkLeaks(t)
	})
}

func testConcurrency(t *testing.T, h *harness) {
	a := h.arena(4 << 20)
	const workers, ops = 8, 300
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			owner := arena.PluginOwner("worker", uint64(w))
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			type held struct {
				r    arena.Region
				fill byte
			}
			var mine []held
			for i := range ops {
				if len(mine) > 0 && (len(mine) >= 8 || rng.IntN(2) == 0) {
					k := rng.IntN(len(mine))
					hd := mine[k]
					mine = append(mine[:k], mine[k+1:]...)
					if b, err := a.Bytes(hd.r); err == nil {
						for j := 0; j < len(b); j += arena.Alignment {
							if c := b[j]; c != hd.fill {
								t.Errorf("worker %d: region %v byte %d is %#x, want %#x: another region overlaps", w, hd.r, j, c, hd.fill)
								break
							}
						}
					}
					if err := a.Free(hd.r); err != nil {
						t.Errorf("worker %d: free %v: %v", w, hd.r, err)
					}
					continue
				}
				n := uint64(1 + rng.IntN(24*kib))
				if rng.IntN(10) == 0 {
					n += 64 * kib // a segment of its own
				}
				r, err := a.Alloc(owner, "churn", n)
				if errors.Is(err, arena.ErrCapacity) {
					continue
				}
				if err != nil {
					t.Errorf("worker %d: alloc %d: %v", w, n, err)
					return
				}
				if rng.IntN(4) == 0 {
					// Hand it over and back: the generation moves on.
					t1, err := a.Transfer(r, arena.HostOwner)
					if err != nil {
						t.Errorf("worker %d: transfer %v: %v", w, r, err)
						return
					}
					if r, err = a.Transfer(t1, owner); err != nil {
						t.Errorf("worker %d: transfer back %v: %v", w, t1, err)
						return
					}
					if err := a.Check(t1); !errors.Is(err, arena.ErrStale) {
						t.Errorf("worker %d: transferred-away descriptor %v: %v", w, t1, err)
					}
				}
				if l, err := a.Lease(r); err != nil || l.Owner != owner {
					t.Errorf("worker %d: lease of %v: %+v %v", w, r, l, err)
				}
				fill := byte(w*31 + i)
				// Regions start on Alignment boundaries, so two that
				// overlap share the first byte of some block: marking one
				// byte per block detects any overlap.
				if b, err := a.Bytes(r); err == nil {
					for j := 0; j < len(b); j += arena.Alignment {
						b[j] = fill
					}
				}
				_ = a.Stats()
				mine = append(mine, held{r, fill})
			}
			// Whatever is left goes back the way a dead plugin's does.
			if n, _ := a.ReleaseOwner(owner); n != len(mine) {
				t.Errorf("worker %d: released %d regions, held %d", w, n, len(mine))
			}
		})
	}
	wg.Wait()
	st := a.Stats()
	// At most one spare segment stays (none when the last ones were
	// released to make room for oversize segments).
	if st.Allocated != 0 || st.Regions != 0 || st.Owners != 0 || st.Segments > 1 || st.Reserved != arena.ByteSize(st.Segments)*64*kib ||
		st.Fragmentation != 0 {
		t.Errorf("after concurrent churn: %+v", st)
	}
	if st.Peak == 0 || st.Peak > st.Capacity {
		t.Errorf("peak %d", st.Peak)
	}
}

func testClose(t *testing.T, h *harness) {
	a := h.arena(1 << 20)
	r := mustAlloc(t, a, arena.HostOwner, "left", 100*kib) // its own segment
	mustAlloc(t, a, arena.PluginOwner("p", 1), "left too", 10)
	if err := a.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	h.backend.checkLeaks(t)
	if _, err := a.Alloc(arena.HostOwner, "late", 1); !errors.Is(err, arena.ErrClosed) {
		t.Errorf("alloc after close: %v", err)
	}
	if err := a.Check(r); !errors.Is(err, arena.ErrClosed) {
		t.Errorf("check after close: %v", err)
	}
	if _, err := a.Bytes(r); !errors.Is(err, arena.ErrClosed) {
		t.Errorf("bytes after close: %v", err)
	}
	if n, _ := a.ReleaseOwner(arena.HostOwner); n != 0 {
		t.Errorf("release after close: %d", n)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

// countingBackend wraps a backend to count segments and inject failures.
type countingBackend struct {
	inner arena.Backend

	mu       sync.Mutex
	made     int
	open     map[uint32]bool
	closed   int
	fail     error
	closeErr error
	// discards records what segments were asked to discard (Discarder
	// segments only), for the Discard test to check against live regions.
	discards   []discard
	discarding bool // the inner backend's segments are Discarders
}

// discard is one Discard call a segment received.
type discard struct {
	seg    uint32
	off, n uint64
	err    error
}

// takeDiscards returns the discards recorded since the last call.
func (b *countingBackend) takeDiscards() []discard {
	b.mu.Lock()
	defer b.mu.Unlock()
	d := b.discards
	b.discards = nil
	return d
}

func (b *countingBackend) Name() string { return b.inner.Name() }

func (b *countingBackend) failNext(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fail = err
}

func (b *countingBackend) Create(id uint32, size uint64) (arena.Segment, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.fail; err != nil {
		b.fail = nil
		return nil, err
	}
	s, err := b.inner.Create(id, size)
	if err != nil {
		return nil, err
	}
	if b.open == nil {
		b.open = make(map[uint32]bool)
	}
	if b.open[id] {
		return nil, fmt.Errorf("segment id %d created twice", id)
	}
	b.made++
	b.open[id] = true
	cs := &countedSegment{Segment: s, b: b, id: id}
	if _, ok := s.(arena.Mover); ok {
		// Keep the backend's byte mover (and reader fill) visible.
		if _, ok := s.(arena.Filler); ok {
			return &countedFiller{&countedMover{cs}}, nil
		}
		return &countedMover{cs}, nil
	}
	if _, ok := s.(arena.Discarder); ok {
		// The discards of a mapped segment are recorded (this runs under
		// the arena's lock, so the wrapper only records; the test checks).
		b.discarding = true
		return &countedDiscarder{cs}, nil
	}
	return cs, nil
}

func (b *countingBackend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed++
	b.closeErr = b.inner.Close()
	return b.closeErr
}

func (b *countingBackend) live() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.open)
}

func (b *countingBackend) created() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.made
}

// checkLeaks fails t unless every segment and the backend were closed once.
func (b *countingBackend) checkLeaks(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.open) != 0 {
		t.Errorf("%s: %d segments never closed", b.inner.Name(), len(b.open))
	}
	if b.closed != 1 {
		t.Errorf("%s: backend closed %d times, want 1", b.inner.Name(), b.closed)
	}
	if b.closeErr != nil {
		t.Errorf("%s: close backend: %v", b.inner.Name(), b.closeErr)
	}
}

type countedSegment struct {
	arena.Segment
	b    *countingBackend
	id   uint32
	once sync.Once
}

func (s *countedSegment) Close() error {
	err := s.Segment.Close()
	s.once.Do(func() {
		s.b.mu.Lock()
		delete(s.b.open, s.id)
		s.b.mu.Unlock()
	})
	return err
}

// countedDiscarder is a countedSegment whose inner segment discards.
type countedDiscarder struct{ *countedSegment }

func (s *countedDiscarder) Discard(off, n uint64) error {
	err := s.Segment.(arena.Discarder).Discard(off, n)
	s.b.mu.Lock()
	s.b.discards = append(s.b.discards, discard{seg: s.id, off: off, n: n, err: err})
	s.b.mu.Unlock()
	return err
}

// countedMover is a countedSegment whose inner segment moves bytes.
type countedMover struct{ *countedSegment }

func (s *countedMover) ReadAt(p []byte, off uint64) error {
	return s.Segment.(arena.Mover).ReadAt(p, off)
}

func (s *countedMover) WriteAt(ctx context.Context, p []byte, off uint64) error {
	return s.Segment.(arena.Mover).WriteAt(ctx, p, off)
}

func (s *countedMover) CopyFrom(src arena.Segment, srcOff, dstOff, n uint64) error {
	switch c := src.(type) {
	case *countedMover:
		src = c.Segment
	case *countedFiller:
		src = c.Segment
	}
	return s.Segment.(arena.Mover).CopyFrom(src, srcOff, dstOff, n)
}

// countedFiller is a countedMover whose inner segment also fills from a
// reader (arena.Filler).
type countedFiller struct{ *countedMover }

func (s *countedFiller) WriteFrom(ctx context.Context, src io.ReaderAt, srcOff, n int64, off uint64) error {
	return s.Segment.(arena.Filler).WriteFrom(ctx, src, srcOff, n, off)
}

// testLogger logs to t at debug level, so a failing test shows the
// arena's events.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
