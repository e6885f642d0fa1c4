package cuda

import (
	"context"
	"fmt"
	"io"

	"github.com/arenahost/arenahost/host/arena"
)

// Mover moves bytes to, from and within device memory. gpu.Device (cuda
// build) and the simulated device of shared/gpu/gpusim satisfy it.
type Mover interface {
	// Upload copies src to dst and returns once the copy completed.
	Uploader
	// Download copies len(dst) bytes from src after the pending work.
	Download(dst []byte, src DevicePtr) error
	// CopyAsync enqueues a device-to-device copy.
	CopyAsync(dst, src DevicePtr, n uint64) error
	// Sync waits for everything enqueued.
	Sync() error
}

// Device is a device as the host's arena uses it: slabs and byte moves.
type Device interface {
	Allocator
	Mover
}

// A device slab moves bytes and fills from readers.
var (
	_ arena.Mover  = (*segment)(nil)
	_ arena.Filler = (*segment)(nil)
)

// pinnedStaging allocates page-locked staging memory on m when the build
// can (the cuda build sets it for gpu.Device); it returns a nil buffer when
// m has no pinned memory.
var pinnedStaging func(m Mover, n int) (buf []byte, free func() error, err error)

// staging returns the buffer a write of n bytes stages through, made on
// first use. It is page-locked memory of b.chunk bytes when the device
// offers it (DMA at full speed); otherwise ordinary host memory, grown on
// demand up to b.chunk bytes. A device without pinned memory (cuda-sim, the
// test fakes, a cuda build whose cuMemAllocHost failed) so takes the same
// path, host copies included, as the cuda build: a source is read into the
// buffer and uploaded from there. Callers hold b.stageMu.
func (b *Backend) staging(n int64) []byte {
	if !b.stageTried {
		b.stageTried = true
		if pinnedStaging != nil {
			buf, free, err := pinnedStaging(b.mv, b.chunk)
			switch {
			case err != nil:
				b.log.Warn("no pinned staging buffer; staging uploads through pageable memory", "bytes", b.chunk, "err", err)
			case len(buf) > 0:
				b.stage, b.stageFree, b.stagePinned = buf, free, true
			}
		}
	}
	if b.stagePinned {
		return b.stage
	}
	if want := int(min(n, int64(b.chunk))); len(b.stage) < want {
		b.stage = make([]byte, max(want, min(2*len(b.stage), b.chunk)))
	}
	return b.stage
}

// addr returns the segment's device address at off, checking that the
// backend moves bytes and the slab is live.
func (s *segment) addr(op string, off, n uint64) (DevicePtr, error) {
	b := s.b
	if b.mv == nil {
		return 0, fmt.Errorf("cuda slab %d: %s: %w: the device %T moves no bytes (not a cuda.Mover)", s.sl.id, op, arena.ErrNoHostView, b.alloc)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.sl.freed || s.sl.closing {
		return 0, fmt.Errorf("cuda slab %d: %s: slab closed", s.sl.id, op)
	}
	if off > s.sl.s.Size || n > s.sl.s.Size-off {
		return 0, fmt.Errorf("cuda slab %d: %s: bytes [%d, %d) past its %d bytes", s.sl.id, op, off, off+n, s.sl.s.Size)
	}
	return s.sl.s.Ptr + DevicePtr(off), nil
}

// ReadAt downloads len(p) bytes at off (arena.Mover), after the device's
// pending work.
func (s *segment) ReadAt(p []byte, off uint64) error {
	src, err := s.addr("read", off, uint64(len(p)))
	if err != nil {
		return err
	}
	if err := s.b.mv.Download(p, src); err != nil {
		return fmt.Errorf("cuda slab %d: download %d bytes at %d: %w", s.sl.id, len(p), off, err)
	}
	return nil
}

// WriteAt uploads p to off (arena.Mover) after the device's pending work,
// in chunks of at most the staging size, each copied into the staging
// buffer and uploaded from there. It checks ctx between chunks.
func (s *segment) WriteAt(ctx context.Context, p []byte, off uint64) error {
	return s.fill(ctx, bytesReaderAt(p), 0, int64(len(p)), off)
}

// WriteFrom uploads n bytes of src, from offset srcOff, to off
// (arena.Filler) after the device's pending work: each chunk is read from
// src straight into the staging buffer (pinned in the cuda build) and
// uploaded from there, one host copy per chunk. A short read from src (a
// file truncated under a guarded mapping) is an error. It checks ctx
// between chunks.
func (s *segment) WriteFrom(ctx context.Context, src io.ReaderAt, srcOff, n int64, off uint64) error {
	if n < 0 || srcOff < 0 {
		return fmt.Errorf("cuda slab %d: write from offset %d, length %d: %w", s.sl.id, srcOff, n, arena.ErrInvalid)
	}
	return s.fill(ctx, src, srcOff, n, off)
}

// fill stages n bytes of src at srcOff to off through the staging buffer.
func (s *segment) fill(ctx context.Context, src io.ReaderAt, srcOff, n int64, off uint64) error {
	dst, err := s.addr("write", off, uint64(n))
	if err != nil || n == 0 {
		return err
	}
	b := s.b
	// Uploads are synchronous; queued copies and kernels must not land
	// after them.
	if err := b.mv.Sync(); err != nil {
		return fmt.Errorf("cuda slab %d: write: sync: %w", s.sl.id, err)
	}
	b.stageMu.Lock()
	defer b.stageMu.Unlock()
	if err := Stage(ctx, b.mv, dst, src, srcOff, n, b.staging(n)); err != nil {
		return fmt.Errorf("cuda slab %d: write %d bytes at %d: %w", s.sl.id, n, off, err)
	}
	return nil
}

// CopyFrom copies n bytes at srcOff of src (a slab of the same backend) to
// dstOff (arena.Mover): a device-to-device copy, then a sync so the bytes
// are in place when it returns.
func (s *segment) CopyFrom(src arena.Segment, srcOff, dstOff, n uint64) error {
	ss, ok := src.(*segment)
	if !ok || ss.b != s.b {
		return fmt.Errorf("cuda slab %d: copy from %T: not a slab of this backend", s.sl.id, src)
	}
	from, err := ss.addr("copy from", srcOff, n)
	if err != nil {
		return err
	}
	to, err := s.addr("copy to", dstOff, n)
	if err != nil {
		return err
	}
	if err := s.b.mv.CopyAsync(to, from, n); err != nil {
		return fmt.Errorf("cuda slab %d: copy %d bytes from slab %d: %w", s.sl.id, n, ss.sl.id, err)
	}
	if err := s.b.mv.Sync(); err != nil {
		return fmt.Errorf("cuda slab %d: copy %d bytes from slab %d: sync: %w", s.sl.id, n, ss.sl.id, err)
	}
	return nil
}

// bytesReaderAt reads from a byte slice (Stage's source for WriteAt).
type bytesReaderAt []byte

func (p bytesReaderAt) ReadAt(dst []byte, off int64) (int, error) {
	if off >= int64(len(p)) {
		return 0, fmt.Errorf("read at %d of %d bytes: past the end", off, len(p))
	}
	n := copy(dst, p[off:])
	if n < len(dst) {
		return n, fmt.Errorf("read %d bytes at %d of %d: past the end", len(dst), off, len(p))
	}
	return n, nil
}
