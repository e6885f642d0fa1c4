package arena_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
)

// recordingDevice wraps the fake device so that its segments record the
// WriteAt calls they get, and, with filler set, are also Fillers that
// record their WriteFrom calls.
type recordingDevice struct {
	*arenatest.FakeDevice
	filler bool

	mu     sync.Mutex
	writes []segCall
}

// segCall is one WriteAt ("write") or WriteFrom ("fill") a segment got.
type segCall struct {
	op     string
	n      int64
	srcOff int64 // fill only
	at     uint64
}

func (d *recordingDevice) record(c segCall) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writes = append(d.writes, c)
}

func (d *recordingDevice) take() []segCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.writes
	d.writes = nil
	return w
}

func (d *recordingDevice) Create(id uint32, size uint64) (arena.Segment, error) {
	s, err := d.FakeDevice.Create(id, size)
	if err != nil {
		return nil, err
	}
	rs := &recordingSlab{Segment: s, d: d}
	if d.filler {
		return &fillingSlab{rs}, nil
	}
	return rs, nil
}

type recordingSlab struct {
	arena.Segment
	d *recordingDevice
}

func (s *recordingSlab) ReadAt(p []byte, off uint64) error {
	return s.Segment.(arena.Mover).ReadAt(p, off)
}

func (s *recordingSlab) WriteAt(ctx context.Context, p []byte, off uint64) error {
	s.d.record(segCall{op: "write", n: int64(len(p)), at: off})
	return s.Segment.(arena.Mover).WriteAt(ctx, p, off)
}

func (s *recordingSlab) CopyFrom(src arena.Segment, srcOff, dstOff, n uint64) error {
	return fmt.Errorf("not used here")
}

// fillingSlab is a Filler: it reads the source in one go (as a device
// reads into its staging buffer) and writes it to the fake slab.
type fillingSlab struct{ *recordingSlab }

func (s *fillingSlab) WriteFrom(ctx context.Context, src io.ReaderAt, srcOff, n int64, off uint64) error {
	s.d.record(segCall{op: "fill", n: n, srcOff: srcOff, at: off})
	p := make([]byte, n)
	if _, err := src.ReadAt(p, srcOff); err != nil {
		return err
	}
	return s.Segment.(arena.Mover).WriteAt(ctx, p, off)
}

// cancelAfter cancels its context once it has served reads reads.
type cancelAfter struct {
	io.ReaderAt
	reads  int
	cancel context.CancelFunc
}

func (c *cancelAfter) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.ReaderAt.ReadAt(p, off)
	if c.reads--; c.reads == 0 {
		c.cancel()
	}
	return n, err
}

// TestWriteFromPaths: on a device segment that is a Filler, WriteFrom hands
// the whole range to it in one call (no arena buffer, no WriteAt); on one
// that only moves bytes it reads through a buffer of at most the fill
// chunk into WriteAt, checking ctx between chunks.
func TestWriteFromPaths(t *testing.T) {
	defer arena.SetFillChunk(1000)()
	src := make([]byte, 10000)
	for i := range src {
		src[i] = byte(i*31 + 7)
	}
	tests := []struct {
		name        string
		filler      bool
		cancelAfter int       // cancel the context after this many source reads
		want        []segCall // at: from the region's start
		wantErr     error
	}{
		{"filler", true, 0, []segCall{{"fill", 2500, 100, 64}}, nil},
		{"mover", false, 0, []segCall{{"write", 1000, 0, 64}, {"write", 1000, 0, 1064}, {"write", 500, 0, 2064}}, nil},
		{"mover cancelled", false, 1, []segCall{{"write", 1000, 0, 64}}, context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := &recordingDevice{FakeDevice: arenatest.NewFakeDevice(0), filler: tc.filler}
			a, err := arena.New(t.Context(), d, arena.Config{Capacity: 1 << 20, RetainEmpty: true, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			r, err := a.Alloc(arena.HostOwner, "r", 4000)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			var rd io.ReaderAt = bytes.NewReader(src)
			if tc.cancelAfter > 0 {
				rd = &cancelAfter{ReaderAt: rd, reads: tc.cancelAfter, cancel: cancel}
			}
			d.take()
			err = a.WriteFrom(ctx, r, 64, rd, 100, 2500)
			got := d.take()
			for i := range got {
				got[i].at -= r.Offset
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("segment calls %v, want %v", got, tc.want)
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("write from: %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			back := make([]byte, 2500)
			if err := a.Read(r, 64, back); err != nil || !bytes.Equal(back, src[100:2600]) {
				t.Fatalf("read back: err %v, equal %v", err, bytes.Equal(back, src[100:2600]))
			}
		})
	}
}
