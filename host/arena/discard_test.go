//go:build linux

package arena_test

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/arenahost/arenahost/host/arena"
	"golang.org/x/sys/unix"
)

// TestFreeReturnsPages: on both CPU modes, freeing a written 32 MiB region
// gives its pages back to the kernel: the segment file's allocated blocks
// drop by about 32 MiB, and so does the resident memory of the host's
// mapping and of a second mapping of the segment (what a plugin holds).
// The small regions on both sides keep their bytes, and a new 32 MiB
// region there reads as zero and works.
func TestFreeReturnsPages(t *testing.T) {
	const big = 32 << 20
	for _, mode := range []arena.CPUMode{arena.CPUMemfd, arena.CPUShmDir} {
		t.Run(string(mode), func(t *testing.T) {
			b, err := arena.NewCPUBackend(arena.CPUConfig{Mode: mode, Dir: shmBase(t), Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			a, err := arena.New(t.Context(), b, arena.Config{Capacity: 256 << 20, Logger: quiet})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { a.Close() })

			left := mustAlloc(t, a, "left", 300)
			r := mustAlloc(t, a, "big", big)
			right := mustAlloc(t, a, "right", 300)
			if left.Segment != r.Segment || right.Segment != r.Segment {
				t.Fatalf("regions in different segments: %v %v %v", left, r, right)
			}
			fill(t, a, left, 0xa1)
			fill(t, a, right, 0xb2)
			fill(t, a, r, 0x5c)
			loc, err := a.Location(r)
			if err != nil {
				t.Fatal(err)
			}
			// A second mapping of the whole segment, as a plugin maps it.
			f, err := os.Open(loc.Path)
			if err != nil {
				t.Fatal(err)
			}
			other, err := unix.Mmap(int(f.Fd()), 0, int(loc.Size), unix.PROT_READ, unix.MAP_SHARED)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Munmap(other) })
			for i := r.Offset; i < r.Offset+r.Length; i += arena.PageSize {
				sink += other[i] // fault the region's pages into this mapping
			}
			host, err := a.Bytes(left)
			if err != nil {
				t.Fatal(err)
			}
			hostAddr, otherAddr := uintptr(unsafe.Pointer(&host[0])), uintptr(unsafe.Pointer(&other[0]))

			blocks0, hostRSS0, otherRSS0 := fileBytes(t, loc.Path), mappingRSS(t, hostAddr), mappingRSS(t, otherAddr)
			if blocks0 < big || hostRSS0 < big || otherRSS0 < big {
				t.Fatalf("after writing %d bytes: file holds %d bytes, host mapping %d resident, other mapping %d", big, blocks0, hostRSS0, otherRSS0)
			}
			discarded0 := a.Stats().Discarded
			if err := a.Free(r); err != nil {
				t.Fatal(err)
			}
			blocks1, hostRSS1, otherRSS1 := fileBytes(t, loc.Path), mappingRSS(t, hostAddr), mappingRSS(t, otherAddr)
			t.Logf("%s: file %d → %d bytes, host mapping %d → %d resident, other mapping %d → %d, Stats.Discarded %v",
				mode, blocks0, blocks1, hostRSS0, hostRSS1, otherRSS0, otherRSS1, a.Stats().Discarded)
			const slack = 2 * arena.PageSize // the pages shared with left and right stay
			for _, c := range []struct {
				what          string
				before, after int64
			}{{"segment file blocks", blocks0, blocks1}, {"host mapping RSS", hostRSS0, hostRSS1}, {"other mapping RSS", otherRSS0, otherRSS1}} {
				if c.before-c.after < big-slack {
					t.Errorf("%s: %d → %d bytes after freeing %d, want a drop of at least %d", c.what, c.before, c.after, big, big-slack)
				}
			}
			if d := a.Stats().Discarded - discarded0; d < big-slack || d > big {
				t.Errorf("Stats.Discarded grew by %d, want about %d", d, big)
			}
			// The other mapping sees the hole (a few pages: reading a hole
			// of shared memory commits a page again).
			first := (r.Offset + arena.PageSize - 1) / arena.PageSize * arena.PageSize
			for _, p := range []uint64{first, first + big/2, first + big - 2*arena.PageSize} {
				if i := bytes.IndexFunc(other[p:p+arena.PageSize], func(c rune) bool { return c != 0 }); i >= 0 {
					t.Fatalf("other mapping: freed byte at segment offset %d is not 0 after the discard", p+uint64(i))
				}
			}
			check(t, a, left, 0xa1)
			check(t, a, right, 0xb2)

			// The contract holds on the discarded range: a new region
			// there reads as zero on its whole pages (the partial pages it
			// shares with left and right keep the old bytes: reused bytes
			// are not cleared), takes writes, and the neighbours stay.
			r2 := mustAlloc(t, a, "again", big)
			if r2.Segment != r.Segment || r2.Offset != r.Offset {
				t.Fatalf("re-allocation at %v, want the freed place %v", r2, r)
			}
			whole := arena.Region{Segment: r2.Segment, Offset: first, Length: big - arena.PageSize, Generation: r2.Generation}
			check(t, a, whole, 0)
			fill(t, a, r2, 0x77)
			check(t, a, r2, 0x77)
			check(t, a, left, 0xa1)
			check(t, a, right, 0xb2)
			if got := fileBytes(t, loc.Path); got < big {
				t.Errorf("after writing the new region the file holds %d bytes, want at least %d", got, big)
			}
		})
	}
}

// sink keeps the page-faulting reads from being optimized away.
var sink byte

func fill(t *testing.T, a *arena.Arena, r arena.Region, c byte) {
	t.Helper()
	if err := a.Write(t.Context(), r, 0, bytes.Repeat([]byte{c}, int(r.Length))); err != nil {
		t.Fatalf("write %v: %v", r, err)
	}
}

func check(t *testing.T, a *arena.Arena, r arena.Region, c byte) {
	t.Helper()
	got := make([]byte, r.Length)
	if err := a.Read(r, 0, got); err != nil {
		t.Fatalf("read %v: %v", r, err)
	}
	for i, v := range got {
		if v != c {
			t.Fatalf("region %v byte %d is %#x, want %#x", r, i, v, c)
		}
	}
}

// fileBytes is the memory a segment file holds (st_blocks × 512).
func fileBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// mappingRSS is the resident bytes of this process's mapping that holds
// addr (its "Rss:" line in /proc/self/smaps).
func mappingRSS(t *testing.T, addr uintptr) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		if lo, hi, ok := vmaRange(line); ok {
			in = addr >= lo && addr < hi
			continue
		}
		if in && strings.HasPrefix(line, "Rss:") {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(strings.TrimPrefix(line, "Rss:")), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("smaps %q: %v", line, err)
			}
			return kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	t.Fatalf("no mapping holds %#x in /proc/self/smaps", addr)
	return 0
}

// vmaRange parses a smaps header line ("7f..-7f.. rw-s ...").
func vmaRange(line string) (lo, hi uintptr, ok bool) {
	field, _, _ := strings.Cut(line, " ")
	l, h, found := strings.Cut(field, "-")
	if !found {
		return 0, 0, false
	}
	a, err1 := strconv.ParseUint(l, 16, 64)
	b, err2 := strconv.ParseUint(h, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return uintptr(a), uintptr(b), true
}
