package cuda

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

// memDevice is an Uploader over a byte slice standing in for device
// memory at base; it records the largest upload.
type memDevice struct {
	base    DevicePtr
	mem     []byte
	largest int
	calls   int
	failAt  int
}

func (m *memDevice) Upload(_ context.Context, dst DevicePtr, src []byte) error {
	m.calls++
	if m.failAt != 0 && m.calls == m.failAt {
		return errors.New("cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS")
	}
	off := int(dst - m.base)
	if off < 0 || off+len(src) > len(m.mem) {
		return errors.New("out of range")
	}
	copy(m.mem[off:], src)
	m.largest = max(m.largest, len(src))
	return nil
}

func TestStage(t *testing.T) {
	src := make([]byte, 10_000)
	for i := range src {
		src[i] = byte(i * 7)
	}
	tests := []struct {
		name      string
		off, n    int64
		buf       int
		wantCalls int
	}{
		{"bounded", 100, 9_000, 1024, 9},
		{"exact multiple", 0, 4096, 1024, 4},
		{"buffer larger", 5, 10, 1 << 16, 1},
		{"empty", 0, 0, 16, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dev := &memDevice{base: 1 << 40, mem: make([]byte, 20_000)}
			err := Stage(t.Context(), dev, dev.base+8, bytes.NewReader(src), tc.off, tc.n, make([]byte, tc.buf))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(dev.mem[8:8+tc.n], src[tc.off:tc.off+tc.n]) {
				t.Fatal("device bytes differ from the source")
			}
			if dev.calls != tc.wantCalls || dev.largest > tc.buf {
				t.Fatalf("%d uploads, largest %d, buffer %d", dev.calls, dev.largest, tc.buf)
			}
		})
	}
}

func TestStageErrors(t *testing.T) {
	src := bytes.NewReader(make([]byte, 100))
	dev := &memDevice{base: 0, mem: make([]byte, 1000)}
	if err := Stage(t.Context(), dev, 0, src, 50, 100, make([]byte, 32)); !errors.Is(err, io.ErrUnexpectedEOF) ||
		!strings.Contains(err.Error(), "offset 82") {
		t.Fatalf("short source: %v", err)
	}
	dev.calls, dev.failAt = 0, 2
	if err := Stage(t.Context(), dev, 0, src, 0, 100, make([]byte, 32)); err == nil || !strings.Contains(err.Error(), "device offset 32") {
		t.Fatalf("upload failure: %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := Stage(ctx, dev, 0, src, 0, 100, make([]byte, 32)); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	if err := Stage(t.Context(), dev, 0, src, 0, 100, nil); err == nil {
		t.Fatal("empty buffer accepted")
	}
}

// TestLoaderIntoArena loads a tensor into an arena region on the fake
// device: the bytes land at slab base + region offset.
func TestLoaderIntoArena(t *testing.T) {
	f := newFakeAlloc()
	b := NewBackend(f, slog.New(slog.DiscardHandler))
	a, err := arena.New(t.Context(), b, arena.Config{Capacity: 8 << 20, SegmentSize: 1 << 20, RetainEmpty: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := a.Alloc(arena.HostOwner, "pad", 1000); err != nil {
		t.Fatal(err)
	}
	r, err := a.Alloc(arena.HostOwner, "w", 3000)
	if err != nil {
		t.Fatal(err)
	}
	base, _ := b.Ptr(r.Segment)
	dev := &memDevice{base: base, mem: make([]byte, 1<<20)}
	src := bytes.Repeat([]byte{1, 2, 3}, 2000)
	l := &Loader{Backend: b, Up: dev, Buf: make([]byte, 512)}
	if err := l.Load(t.Context(), r, bytes.NewReader(src), 10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dev.mem[r.Offset:r.Offset+3000], src[10:3010]) || dev.largest > 512 {
		t.Fatalf("loaded bytes differ or staging exceeded (largest %d)", dev.largest)
	}
	if err := l.Load(t.Context(), arena.Region{Segment: 99, Length: 1}, bytes.NewReader(src), 0); err == nil {
		t.Fatal("unknown segment accepted")
	}
}
