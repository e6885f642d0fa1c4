package cuda

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"unsafe"

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
	f.uploadSrc = append(f.uploadSrc, unsafe.SliceData(src))
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

// recordingReader serves data and records where each read landed; it fails
// with err past len(data), and calls onRead after each read.
type recordingReader struct {
	data   []byte
	err    error
	dsts   []*byte
	onRead func()
}

func (r *recordingReader) ReadAt(p []byte, off int64) (int, error) {
	r.dsts = append(r.dsts, unsafe.SliceData(p))
	if r.onRead != nil {
		r.onRead()
	}
	if off >= int64(len(r.data)) {
		return 0, r.err
	}
	n := copy(p, r.data[off:])
	if n < len(p) {
		return n, r.err
	}
	return n, nil
}

// TestWriteFrom: the arena's WriteFrom on a device slab reads each chunk
// of the source straight into the backend's staging buffer and uploads it
// from there (one host copy), in chunks of the staging size; a short or
// failing source and cancellation stop it with an error naming the slab.
func TestWriteFrom(t *testing.T) {
	f := newFakeAlloc()
	a, b := newArena(t, f)
	defer a.Close()
	b.chunk = 1000
	r, err := a.Alloc(arena.HostOwner, "r", 4000)
	if err != nil {
		t.Fatal(err)
	}
	src := make([]byte, 5000)
	for i := range src {
		src[i] = byte(i*29 + 3)
	}
	errFault := errors.New("memory fault reading the mapping (file truncated while open?)")
	tests := []struct {
		name        string
		data        []byte // the reader's bytes; reads past them fail
		readErr     error
		cancel      bool // cancel the context on the first read
		off, srcOff int64
		n           int64
		wantUploads []int
		wantErr     error
	}{
		{"chunked", src, nil, false, 100, 1234, 2500, []int{1000, 1000, 500}, nil},
		{"one chunk", src, nil, false, 0, 0, 1000, []int{1000}, nil},
		{"empty", src, nil, false, 4000, 0, 0, nil, nil},
		{"short source", src[:1700], nil, false, 0, 0, 2500, []int{1000}, io.ErrUnexpectedEOF},
		{"source faults", src[:1000], errFault, false, 0, 0, 2500, []int{1000}, errFault},
		{"cancelled", src, nil, true, 0, 0, 2500, nil, context.Canceled},
		{"negative length", src, nil, false, 0, 0, -1, nil, arena.ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			rd := &recordingReader{data: tc.data, err: tc.readErr}
			if tc.cancel {
				rd.onRead = cancel
			}
			f.mu.Lock()
			f.uploads, f.uploadSrc = nil, nil
			f.mu.Unlock()
			err := a.WriteFrom(ctx, r, uint64(tc.off), rd, tc.srcOff, tc.n)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("write from: %v, want %v", err, tc.wantErr)
			}
			if err != nil && tc.n >= 0 && !strings.Contains(err.Error(), "cuda slab") {
				t.Errorf("error %q does not name the slab", err)
			}
			f.mu.Lock()
			uploads, srcs := f.uploads, f.uploadSrc
			f.mu.Unlock()
			if fmt.Sprint(uploads) != fmt.Sprint(tc.wantUploads) {
				t.Fatalf("uploads %v, want %v", uploads, tc.wantUploads)
			}
			// One host copy: every upload sends the very bytes the reader
			// wrote, in the staging buffer, with no copy in between.
			for i, p := range srcs {
				if p != rd.dsts[i] || p != unsafe.SliceData(b.stage) {
					t.Fatalf("upload %d sends %p; the reader wrote to %p, the staging buffer is %p", i, p, rd.dsts[i], unsafe.SliceData(b.stage))
				}
			}
			if len(b.stage) > b.chunk {
				t.Fatalf("staging buffer of %d bytes, over the %d-byte chunk", len(b.stage), b.chunk)
			}
			if err != nil {
				return
			}
			back := make([]byte, tc.n)
			if err := a.Read(r, uint64(tc.off), back); err != nil || !bytes.Equal(back, src[tc.srcOff:tc.srcOff+tc.n]) {
				t.Fatalf("read back: err %v, equal %v", err, bytes.Equal(back, src[tc.srcOff:tc.srcOff+tc.n]))
			}
		})
	}
}
