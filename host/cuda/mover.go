package cuda

import (
	"context"
	"fmt"

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

// pinnedStaging allocates page-locked staging memory on m when the build
// can (the cuda build sets it for gpu.Device); it returns a nil buffer when
// m has no pinned memory.
var pinnedStaging func(m Mover, n int) (buf []byte, free func() error, err error)

// staging returns the buffer Write stages uploads through, made on first
// use: pinned memory when the device offers it (DMA at full speed), else
// nil (upload straight from the caller's bytes, in chunks of b.chunk).
// Callers hold b.stageMu.
func (b *Backend) staging() []byte {
	if b.stageTried {
		return b.stage
	}
	b.stageTried = true
	if pinnedStaging == nil {
		return nil
	}
	buf, free, err := pinnedStaging(b.mv, b.chunk)
	if err != nil {
		b.log.Warn("no pinned staging buffer; uploading from pageable memory", "bytes", b.chunk, "err", err)
		return nil
	}
	b.stage, b.stageFree = buf, free
	return buf
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
// in chunks of at most the staging size, through the pinned staging
// buffer when there is one. It checks ctx between chunks.
func (s *segment) WriteAt(ctx context.Context, p []byte, off uint64) error {
	dst, err := s.addr("write", off, uint64(len(p)))
	if err != nil {
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
	if buf := b.staging(); buf != nil {
		if err := Stage(ctx, b.mv, dst, bytesReaderAt(p), 0, int64(len(p)), buf); err != nil {
			return fmt.Errorf("cuda slab %d: write %d bytes at %d: %w", s.sl.id, len(p), off, err)
		}
		return nil
	}
	for done := 0; done < len(p); {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("cuda slab %d: write at byte %d of %d: %w", s.sl.id, done, len(p), err)
		}
		n := min(len(p)-done, b.chunk)
		if err := b.mv.Upload(ctx, dst+DevicePtr(done), p[done:done+n]); err != nil {
			return fmt.Errorf("cuda slab %d: upload %d bytes at %d: %w", s.sl.id, n, off+uint64(done), err)
		}
		done += n
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

// bytesReaderAt reads from a byte slice (Stage's source for Write).
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
