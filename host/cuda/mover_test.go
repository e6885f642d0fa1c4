package cuda

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
)

// The fake allocator is also a fake Mover: each slab's "device memory" is
// host memory made on first use, uploads land at once, device-to-device
// copies are queued until Sync (as on a stream), and Download syncs first,
// like the real and simulated devices.

// memAt returns the fake device memory [p, p+n). Callers hold f.mu.
func (f *fakeAlloc) memAt(p DevicePtr, n uint64) ([]byte, error) {
	for base, s := range f.live {
		if p >= base && uint64(p-base) <= s.Size && n <= s.Size-uint64(p-base) {
			if f.mem == nil {
				f.mem = map[DevicePtr][]byte{}
			}
			m := f.mem[base]
			if m == nil {
				m = make([]byte, s.Size)
				f.mem[base] = m
			}
			off := uint64(p - base)
			return m[off : off+n], nil
		}
	}
	return nil, fmt.Errorf("address %#x (+%d): CUDA_ERROR_INVALID_VALUE (not in a live slab)", p, n)
}

func (f *fakeAlloc) Upload(ctx context.Context, dst DevicePtr, src []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.uploads = append(f.uploads, len(src))
	if f.uploadErr != nil {
		return f.uploadErr
	}
	m, err := f.memAt(dst, uint64(len(src)))
	if err != nil {
		return err
	}
	copy(m, src)
	return nil
}

func (f *fakeAlloc) Download(dst []byte, src DevicePtr) error {
	if err := f.Sync(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	m, err := f.memAt(src, uint64(len(dst)))
	if err != nil {
		return err
	}
	copy(dst, m)
	return nil
}

func (f *fakeAlloc) CopyAsync(dst, src DevicePtr, n uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queued = append(f.queued, [3]uint64{uint64(dst), uint64(src), n})
	return nil
}

func (f *fakeAlloc) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncs++
	q := f.queued
	f.queued = nil
	for _, c := range q {
		to, err := f.memAt(DevicePtr(c[0]), c[2])
		if err != nil {
			return err
		}
		from, err := f.memAt(DevicePtr(c[1]), c[2])
		if err != nil {
			return err
		}
		copy(to, from)
	}
	return nil
}

// allocOnly hides the fake's Mover methods: a backend over it moves no bytes.
type allocOnly struct{ f *fakeAlloc }

func (a allocOnly) Device() int                     { return a.f.Device() }
func (a allocOnly) Alloc(size uint64) (Slab, error) { return a.f.Alloc(size) }
func (a allocOnly) Free(s Slab) error               { return a.f.Free(s) }

// TestMove: Write uploads in chunks no larger than the staging size, Copy
// is ordered (synced) before it returns, and a device without a Mover or a
// failing upload gives a clear error.
func TestMove(t *testing.T) {
	f := newFakeAlloc()
	a, b := newArena(t, f)
	defer a.Close()
	b.chunk = 1000
	r1, err := a.Alloc(arena.HostOwner, "r1", 4500)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := a.Alloc(arena.HostOwner, "r2", 4500)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4500)
	for i := range p {
		p[i] = byte(i*13 + 1)
	}
	tests := []struct {
		name        string
		off, n      int
		wantUploads []int
	}{
		{"chunked", 0, 4500, []int{1000, 1000, 1000, 1000, 500}},
		{"one chunk", 100, 999, []int{999}},
		{"empty", 4500, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f.mu.Lock()
			f.uploads = nil
			f.mu.Unlock()
			if err := a.Write(t.Context(), r1, uint64(tc.off), p[:tc.n]); err != nil {
				t.Fatal(err)
			}
			f.mu.Lock()
			got := f.uploads
			f.mu.Unlock()
			if fmt.Sprint(got) != fmt.Sprint(tc.wantUploads) {
				t.Fatalf("uploads %v, want %v", got, tc.wantUploads)
			}
			back := make([]byte, tc.n)
			if err := a.Read(r1, uint64(tc.off), back); err != nil || !bytes.Equal(back, p[:tc.n]) {
				t.Fatalf("read back: err %v, equal %v", err, bytes.Equal(back, p[:tc.n]))
			}
		})
	}
	syncs := f.syncs
	if err := a.Copy(r2, r1); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	queued, synced := len(f.queued), f.syncs > syncs
	f.mu.Unlock()
	if queued != 0 || !synced {
		t.Fatalf("copy returned with %d copies queued, synced %v", queued, synced)
	}
	want := make([]byte, 4500)
	if err := a.Read(r1, 0, want); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4500)
	if err := a.Read(r2, 0, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("copy: err %v equal %v", err, bytes.Equal(got, want))
	}
	if _, err := a.Bytes(r1); !errors.Is(err, arena.ErrNoHostView) {
		t.Fatalf("bytes of a device region: %v, want ErrNoHostView", err)
	}

	f.uploadErr = errors.New("cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS")
	if err := a.Write(t.Context(), r1, 0, p); err == nil || !strings.Contains(err.Error(), "ILLEGAL_ADDRESS") {
		t.Fatalf("failing upload: %v", err)
	}
	f.uploadErr = nil

	a2, err := arena.New(t.Context(), NewBackend(allocOnly{newFakeAlloc()}, nil), arena.Config{Capacity: 1 << 20, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	r, err := a2.Alloc(arena.HostOwner, "x", 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := a2.Write(t.Context(), r, 0, []byte{1}); !errors.Is(err, arena.ErrNoHostView) || !strings.Contains(err.Error(), "moves no bytes") {
		t.Fatalf("write through a device without a Mover: %v", err)
	}
}
