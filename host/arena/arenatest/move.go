package arenatest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

// pattern returns n bytes that differ from every other seed's.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

// testMove checks Read, Write and Copy, which work on every backend
// (through the host mapping or the segment's Mover), against each other and
// against Bytes where the host maps the memory.
func testMove(t *testing.T, h *harness) {
	a := h.arena(1<<20, retainEmpty)
	ctx := t.Context()
	r1 := mustAlloc(t, a, arena.HostOwner, "r1", 3000)
	r2 := mustAlloc(t, a, arena.HostOwner, "r2", 5000)
	big := mustAlloc(t, a, arena.HostOwner, "big", 100*kib) // a segment of its own
	if big.Segment == r1.Segment {
		t.Fatalf("the 100 KiB region shares segment %d with a small one; want a segment of its own", big.Segment)
	}

	zero := make([]byte, 3000)
	got := make([]byte, 3000)
	if err := a.Read(r1, 0, got); err != nil || !bytes.Equal(got, zero) {
		t.Fatalf("read of a fresh region: err %v, zero %v", err, bytes.Equal(got, zero))
	}
	if a.Mapped() {
		if _, ok := hostView(t, a, r1); !ok {
			t.Fatal("Mapped is true but Bytes has no host view")
		}
	} else if _, ok := hostView(t, a, r1); ok {
		t.Fatal("Mapped is false but Bytes gives a host view")
	}

	writes := []struct {
		name string
		r    arena.Region
		off  uint64
		n    int
		seed byte
	}{
		{"whole", r1, 0, 3000, 1},
		{"tail", r1, 2000, 1000, 2},
		{"middle", r2, 17, 333, 3},
		{"inside a range", arena.Region{Segment: r2.Segment, Offset: r2.Offset + 1000, Length: 2000, Generation: r2.Generation}, 5, 100, 4},
		{"large", big, 0, 100 * kib, 5},
		{"empty", r2, 5000, 0, 6},
	}
	for _, w := range writes {
		t.Run("write/"+w.name, func(t *testing.T) {
			p := pattern(w.n, w.seed)
			if err := a.Write(ctx, w.r, w.off, p); err != nil {
				t.Fatalf("write: %v", err)
			}
			back := make([]byte, w.n)
			if err := a.Read(w.r, w.off, back); err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(back, p) {
				t.Fatalf("read back differs from what was written")
			}
			if view, ok := hostView(t, a, w.r); ok && !bytes.Equal(view[w.off:w.off+uint64(w.n)], p) {
				t.Fatalf("Bytes differs from what was written")
			}
		})
	}

	// Copy: same length, into a longer destination (its tail untouched),
	// across segments, and a range inside a region.
	before := make([]byte, 5000)
	if err := a.Read(r2, 0, before); err != nil {
		t.Fatal(err)
	}
	if err := a.Copy(r2, r1); err != nil {
		t.Fatalf("copy r1 into the longer r2: %v", err)
	}
	want := append(pattern(3000, 1)[:2000:2000], pattern(1000, 2)...)
	after := make([]byte, 5000)
	if err := a.Read(r2, 0, after); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after[:3000], want) || !bytes.Equal(after[3000:], before[3000:]) {
		t.Fatalf("copy into a longer region: head matches %v, tail untouched %v",
			bytes.Equal(after[:3000], want), bytes.Equal(after[3000:], before[3000:]))
	}
	sub := arena.Region{Segment: big.Segment, Offset: big.Offset + 4096, Length: 3000, Generation: big.Generation}
	if err := a.Copy(r1, sub); err != nil {
		t.Fatalf("copy across segments: %v", err)
	}
	if err := a.Read(r1, 0, got); err != nil || !bytes.Equal(got, pattern(100*kib, 5)[4096:4096+3000]) {
		t.Fatalf("copy across segments: read err %v, bytes match %v", err, bytes.Equal(got, pattern(100*kib, 5)[4096:4096+3000]))
	}

	stale := mustAlloc(t, a, arena.HostOwner, "stale", 512)
	mustFree(t, a, stale)
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	bad := []struct {
		name string
		err  error
		is   error
	}{
		{"read past the region", a.Read(r1, 2999, make([]byte, 2)), arena.ErrInvalid},
		{"write past the region", a.Write(ctx, r1, 3001, nil), arena.ErrInvalid},
		{"read of a freed region", a.Read(stale, 0, make([]byte, 1)), arena.ErrStale},
		{"write to a freed region", a.Write(ctx, stale, 0, []byte{1}), arena.ErrStale},
		{"write with a cancelled context", a.Write(canceled, r1, 0, []byte{1}), context.Canceled},
		{"copy into a shorter region", a.Copy(r1, r2), arena.ErrInvalid},
		{"copy from a freed region", a.Copy(r2, stale), arena.ErrStale},
		{"copy onto itself", a.Copy(r1, r1), arena.ErrInvalid},
		{"copy between overlapping ranges", a.Copy(
			arena.Region{Segment: big.Segment, Offset: big.Offset + 100, Length: 1000, Generation: big.Generation},
			arena.Region{Segment: big.Segment, Offset: big.Offset, Length: 1000, Generation: big.Generation}), arena.ErrInvalid},
	}
	for _, b := range bad {
		if !errors.Is(b.err, b.is) {
			t.Errorf("%s: error %v, want %v", b.name, b.err, b.is)
		}
	}
	// The failed calls changed nothing.
	if err := a.Read(r1, 0, got); err != nil || !bytes.Equal(got, pattern(100*kib, 5)[4096:4096+3000]) {
		t.Fatalf("a failed call changed r1: read err %v", err)
	}
}

// failingReader gives err after its first n bytes.
type failingReader struct {
	data []byte
	err  error
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(f.data)) {
		return 0, f.err
	}
	n := copy(p, f.data[off:])
	if n < len(p) {
		return n, f.err
	}
	return n, nil
}

// testWriteFrom checks WriteFrom, which fills a region from a reader on
// every backend (through the host mapping, a Filler segment, or a buffer
// into the segment's WriteAt), against Read, and its errors.
func testWriteFrom(t *testing.T, h *harness) {
	a := h.arena(1<<20, retainEmpty)
	ctx := t.Context()
	r1 := mustAlloc(t, a, arena.HostOwner, "r1", 3000)
	big := mustAlloc(t, a, arena.HostOwner, "big", 100*kib)
	src := pattern(200*kib, 9)
	in := arena.Region{Segment: big.Segment, Offset: big.Offset + 8192, Length: 4000, Generation: big.Generation}

	fills := []struct {
		name      string
		r         arena.Region
		off       uint64
		srcOff, n int64
	}{
		{"whole", r1, 0, 0, 3000},
		{"from a source offset", r1, 1000, 4321, 2000},
		{"inside a range", in, 10, 77, 3990},
		{"large", big, 0, 50 * kib, 100 * kib},
		{"empty", r1, 3000, 0, 0},
	}
	for _, f := range fills {
		t.Run("fill/"+f.name, func(t *testing.T) {
			if err := a.WriteFrom(ctx, f.r, f.off, bytes.NewReader(src), f.srcOff, f.n); err != nil {
				t.Fatalf("write from: %v", err)
			}
			back := make([]byte, f.n)
			if err := a.Read(f.r, f.off, back); err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(back, src[f.srcOff:f.srcOff+f.n]) {
				t.Fatal("read back differs from the source bytes")
			}
			if view, ok := hostView(t, a, f.r); ok && !bytes.Equal(view[f.off:f.off+uint64(f.n)], back) {
				t.Fatal("Bytes differs from what was filled")
			}
		})
	}

	// r1 holds: src[0:1000] then src[4321:6321].
	want := append(append([]byte{}, src[:1000]...), src[4321:6321]...)
	stale := mustAlloc(t, a, arena.HostOwner, "stale", 512)
	mustFree(t, a, stale)
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	errDisk := errors.New("input/output error")
	bad := []struct {
		name string
		err  error
		is   error
	}{
		{"source too short", a.WriteFrom(ctx, r1, 0, bytes.NewReader(src[:2500]), 0, 3000), io.ErrUnexpectedEOF},
		{"source fails", a.WriteFrom(ctx, r1, 0, failingReader{src[:10], errDisk}, 0, 3000), errDisk},
		{"past the region", a.WriteFrom(ctx, r1, 1, bytes.NewReader(src), 0, 3000), arena.ErrInvalid},
		{"negative length", a.WriteFrom(ctx, r1, 0, bytes.NewReader(src), 0, -1), arena.ErrInvalid},
		{"negative source offset", a.WriteFrom(ctx, r1, 0, bytes.NewReader(src), -1, 10), arena.ErrInvalid},
		{"freed region", a.WriteFrom(ctx, stale, 0, bytes.NewReader(src), 0, 10), arena.ErrStale},
		{"cancelled context", a.WriteFrom(canceled, r1, 0, bytes.NewReader(src), 0, 10), context.Canceled},
	}
	for _, b := range bad {
		if !errors.Is(b.err, b.is) {
			t.Errorf("%s: error %v, want %v", b.name, b.err, b.is)
		}
	}
	// Only the failed reads may have left bytes behind: the calls refused
	// up front changed nothing past the first 2500 bytes.
	got := make([]byte, 3000)
	if err := a.Read(r1, 0, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[2500:], want[2500:]) {
		t.Fatal("a refused WriteFrom changed r1")
	}
}
