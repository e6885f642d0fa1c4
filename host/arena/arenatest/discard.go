package arenatest

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

// testDiscard churns allocations and frees over segments of several
// DiscardMin and checks, on every backend, that live regions keep their
// bytes; on backends whose segments are Discarders it also checks every
// Discard call: page-aligned, inside its segment, over no live region's
// bytes (not even a partial page), and that once everything is free no
// page written by a region is left undiscarded, that a region made over
// discarded pages reads as zero, and that Stats.Discarded adds them up.
func testDiscard(t *testing.T, h *harness) {
	const segSize = 8 * arena.DiscardMin
	a := h.arena(8*segSize, retainEmpty, func(c *arena.Config) { c.SegmentSize = segSize })
	rng := rand.New(rand.NewPCG(15, 15))

	type live struct {
		r    arena.Region
		size uint64 // aligned
		fill byte
	}
	var regions []live
	// dirty holds, per segment, the pages a region has written and no
	// discard has dropped since.
	dirty := map[uint32]map[uint64]bool{}
	var discarded uint64
	ctx := t.Context()

	checkDiscards := func(when string) {
		t.Helper()
		for _, d := range h.backend.takeDiscards() {
			if d.err != nil {
				t.Fatalf("%s: discard [%d, %d) of segment %d: %v", when, d.off, d.off+d.n, d.seg, d.err)
			}
			if d.n == 0 || d.off%arena.PageSize != 0 || d.n%arena.PageSize != 0 || d.off+d.n > segSize {
				t.Fatalf("%s: discard [%d, %d) of segment %d: not whole pages inside the %d-byte segment", when, d.off, d.off+d.n, d.seg, segSize)
			}
			for _, l := range regions {
				if l.r.Segment == d.seg && l.r.Offset < d.off+d.n && d.off < l.r.Offset+l.size {
					t.Fatalf("%s: discard [%d, %d) of segment %d overlaps live region %v", when, d.off, d.off+d.n, d.seg, l.r)
				}
			}
			for p := d.off; p < d.off+d.n; p += arena.PageSize {
				delete(dirty[d.seg], p)
			}
			discarded += d.n
		}
	}
	checkLive := func(when string) {
		t.Helper()
		for _, l := range regions {
			got := make([]byte, l.r.Length)
			if err := a.Read(l.r, 0, got); err != nil {
				t.Fatalf("%s: read %v: %v", when, l.r, err)
			}
			for j, c := range got {
				if c != l.fill {
					t.Fatalf("%s: region %v byte %d is %#x, want %#x (a discard or a neighbour clobbered it)", when, l.r, j, c, l.fill)
				}
			}
		}
	}
	free := func(i int) {
		t.Helper()
		mustFree(t, a, regions[i].r)
		regions[i] = regions[len(regions)-1]
		regions = regions[:len(regions)-1]
	}

	for step := range 600 {
		if len(regions) > 0 && (rng.IntN(100) < 45 || len(regions) > 40) {
			free(rng.IntN(len(regions)))
			checkDiscards("free")
		} else {
			var n uint64
			switch rng.IntN(4) {
			case 0:
				n = 1 + rng.Uint64N(600) // small, sharing pages
			case 1:
				n = 1 + rng.Uint64N(3*arena.PageSize)
			case 2:
				n = 1 + rng.Uint64N(2*arena.DiscardMin)
			default:
				n = arena.DiscardMin + rng.Uint64N(3*arena.DiscardMin)
			}
			r, err := a.Alloc(arena.HostOwner, "churn", n)
			if err != nil {
				continue // full: the next steps free
			}
			fill := byte(1 + step%255)
			if err := a.Write(ctx, r, 0, bytes.Repeat([]byte{fill}, int(n))); err != nil {
				t.Fatalf("write %v: %v", r, err)
			}
			size := (n + arena.Alignment - 1) / arena.Alignment * arena.Alignment
			regions = append(regions, live{r: r, size: size, fill: fill})
			if dirty[r.Segment] == nil {
				dirty[r.Segment] = map[uint64]bool{}
			}
			for p := r.Offset / arena.PageSize * arena.PageSize; p < r.Offset+n; p += arena.PageSize {
				dirty[r.Segment][p] = true
			}
		}
		if step%50 == 0 {
			checkLive("churn")
		}
	}
	checkLive("end of churn")
	for len(regions) > 0 {
		free(len(regions) - 1)
		checkDiscards("free all")
	}
	if !h.backend.discarding {
		if st := a.Stats(); st.Discarded != 0 {
			t.Errorf("backend without Discarder: Stats.Discarded %v, want 0", st.Discarded)
		}
		return
	}
	if discarded == 0 {
		t.Fatalf("a Discarder backend was never asked to discard")
	}
	for seg, pages := range dirty {
		if len(pages) > 0 {
			t.Errorf("segment %d: %d written pages not discarded after everything was freed", seg, len(pages))
		}
	}
	if st := a.Stats(); uint64(st.Discarded) != discarded {
		t.Errorf("Stats.Discarded %d, want the %d bytes the segments were asked to discard", st.Discarded, discarded)
	}
	// Whole segments are free and discarded: a region over one reads zero.
	r := mustAlloc(t, a, arena.HostOwner, "after", segSize)
	got := make([]byte, segSize)
	if err := a.Read(r, 0, got); err != nil {
		t.Fatal(err)
	}
	for i, c := range got {
		if c != 0 {
			t.Fatalf("region %v over discarded pages: byte %d is %#x, want 0", r, i, c)
		}
	}
	mustFree(t, a, r)
	checkDiscards("free after")
}
