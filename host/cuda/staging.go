package cuda

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/arenahost/arenahost/host/arena"
)

// DefaultStagingBytes is the pinned staging buffer the loader uses when
// none is given: large enough to keep a PCIe link busy, small enough that
// loading a 12 GB checkpoint never holds more than this in host memory.
const DefaultStagingBytes = 64 << 20

// Uploader copies host bytes into device memory. The cuda build's Device
// copies from a pinned buffer (cuMemcpyHtoDAsync, then a stream sync), so
// src can be reused when Upload returns.
type Uploader interface {
	Upload(ctx context.Context, dst DevicePtr, src []byte) error
}

// Stage copies n bytes of r, from offset off, to device address dst,
// through buf: never more than len(buf) bytes of the tensor are in host
// memory at once. Give it the pinned staging buffer (Device.PinnedBuffer
// in the cuda build) for full-speed DMA.
func Stage(ctx context.Context, up Uploader, dst DevicePtr, r io.ReaderAt, off, n int64, buf []byte) error {
	if len(buf) == 0 {
		return fmt.Errorf("stage: empty staging buffer")
	}
	if n < 0 || off < 0 {
		return fmt.Errorf("stage: offset %d length %d", off, n)
	}
	for done := int64(0); done < n; {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("stage: at byte %d of %d: %w", done, n, err)
		}
		chunk := buf[:min(int64(len(buf)), n-done)]
		k, err := r.ReadAt(chunk, off+done)
		if k < len(chunk) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("stage: read %d bytes at offset %d: %w", len(chunk), off+done, err)
		}
		if err := up.Upload(ctx, dst+DevicePtr(done), chunk); err != nil {
			return fmt.Errorf("stage: upload %d bytes to device offset %d: %w", len(chunk), done, err)
		}
		done += int64(len(chunk))
	}
	return nil
}

// Loader loads tensors straight into arena regions on the device: the
// device half of the registry's load path (registry.Memory's Bytes is nil
// for device memory, so a device-aware loader calls Load per tensor).
type Loader struct {
	Backend *Backend
	Up      Uploader
	Buf     []byte // the staging buffer; its length bounds host memory
}

// Load copies the region's Length bytes of src, from offset off, into the
// region r.
func (l *Loader) Load(ctx context.Context, r arena.Region, src io.ReaderAt, off int64) error {
	base, err := l.Backend.Ptr(r.Segment)
	if err != nil {
		return fmt.Errorf("load %s: %w", r, err)
	}
	if err := Stage(ctx, l.Up, base+DevicePtr(r.Offset), src, off, int64(r.Length), l.Buf); err != nil {
		return fmt.Errorf("load %s: %w", r, err)
	}
	return nil
}
