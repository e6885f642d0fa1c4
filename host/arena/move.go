package arena

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
)

// fillChunk bounds the bytes WriteFrom moves between two cancellation
// checks, and the buffer it reads through for a device segment that is no
// Filler (a variable so that tests can make chunks small).
var fillChunk int64 = 4 << 20

// fillBufs holds WriteFrom's read buffers for segments that are no Filler.
var fillBufs sync.Pool

// Mapped reports whether the host maps the arena's memory (Bytes works):
// true on the CPU backends, false on a device backend.
func (a *Arena) Mapped() bool { return a.mapped }

// span resolves [off, off+n) of r, a live region or a range inside one,
// to its segment. Callers hold mu.
func (a *Arena) span(r Region, off, n uint64) (*segment, error) {
	s, _, err := a.lookup(r, false)
	if err != nil {
		return nil, err
	}
	if off > r.Length || n > r.Length-off {
		return nil, fmt.Errorf("%w: bytes [%d, %d) run past the region's %d bytes", ErrInvalid, off, off+n, r.Length)
	}
	if s.mem == nil {
		if _, ok := s.seg.(Mover); !ok {
			return nil, fmt.Errorf("%w (%s backend): its segments do not move bytes", ErrNoHostView, a.name)
		}
	}
	return s, nil
}

// Read copies len(p) bytes of r, from byte off of r, into p. It works on
// every backend: a host-mapped segment is copied from its mapping, a device
// segment downloaded (after the device's pending work). Like Bytes, the
// caller must keep r live until Read returns.
func (a *Arena) Read(r Region, off uint64, p []byte) error {
	a.mu.Lock()
	s, err := a.span(r, off, uint64(len(p)))
	a.mu.Unlock()
	if err != nil {
		return fmt.Errorf("read %d bytes at %d of region %v: %w", len(p), off, r, err)
	}
	if len(p) == 0 {
		return nil
	}
	at := r.Offset + off
	if s.mem != nil {
		copy(p, s.mem[at:at+uint64(len(p))])
		return nil
	}
	if err := s.seg.(Mover).ReadAt(p, at); err != nil {
		return fmt.Errorf("read %d bytes at %d of region %v: %w", len(p), off, r, err)
	}
	return nil
}

// Write copies p into r from byte off of r and returns once the bytes are
// in place. On a device segment the bytes are uploaded through the
// backend's bounded staging buffer, so p can be any host memory.
func (a *Arena) Write(ctx context.Context, r Region, off uint64, p []byte) error {
	a.mu.Lock()
	s, err := a.span(r, off, uint64(len(p)))
	a.mu.Unlock()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return fmt.Errorf("write %d bytes at %d of region %v: %w", len(p), off, r, err)
	}
	if len(p) == 0 {
		return nil
	}
	at := r.Offset + off
	if s.mem != nil {
		copy(s.mem[at:at+uint64(len(p))], p)
		return nil
	}
	if err := s.seg.(Mover).WriteAt(ctx, p, at); err != nil {
		return fmt.Errorf("write %d bytes at %d of region %v: %w", len(p), off, r, err)
	}
	return nil
}

// WriteFrom copies n bytes of src, from offset srcOff, into r from byte
// off of r, and returns once the bytes are in place. It reads src once per
// chunk, with no buffer of the caller's: a host-mapped segment is read
// into straight through its mapping; a device segment that is a Filler
// reads src straight into the device's staging buffer and uploads from
// there (one host copy per chunk, where Write of a buffer the caller
// filled makes two); any other device segment reads through a bounded
// buffer of the arena's into WriteAt. A short read from src is an error
// (io.ErrUnexpectedEOF when src gives none of its own); the bytes written
// before it stay. ctx is checked between chunks. Like Write, the caller
// must keep r live until WriteFrom returns.
func (a *Arena) WriteFrom(ctx context.Context, r Region, off uint64, src io.ReaderAt, srcOff, n int64) error {
	fail := func(err error) error {
		return fmt.Errorf("write %d bytes from offset %d of the source at %d of region %v: %w", n, srcOff, off, r, err)
	}
	if n < 0 || srcOff < 0 {
		return fail(fmt.Errorf("%w: negative source offset or length", ErrInvalid))
	}
	a.mu.Lock()
	s, err := a.span(r, off, uint64(n))
	a.mu.Unlock()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return fail(err)
	}
	if n == 0 {
		return nil
	}
	at := r.Offset + off
	if f, ok := s.seg.(Filler); ok && s.mem == nil {
		if err := f.WriteFrom(ctx, src, srcOff, n, at); err != nil {
			return fail(err)
		}
		return nil
	}
	var buf []byte
	if s.mem == nil {
		bp, _ := fillBufs.Get().(*[]byte)
		if bp == nil || int64(len(*bp)) < min(n, fillChunk) {
			b := make([]byte, min(n, fillChunk))
			bp = &b
		}
		defer fillBufs.Put(bp)
		buf = *bp
	}
	for done := int64(0); done < n; {
		if done > 0 {
			if err := ctx.Err(); err != nil {
				return fail(fmt.Errorf("at byte %d: %w", done, err))
			}
		}
		k := min(n-done, fillChunk)
		dst := at + uint64(done)
		if s.mem != nil {
			err = readFull(src, s.mem[dst:dst+uint64(k)], srcOff+done)
		} else if err = readFull(src, buf[:k], srcOff+done); err == nil {
			err = s.seg.(Mover).WriteAt(ctx, buf[:k], dst)
		}
		if err != nil {
			return fail(err)
		}
		done += k
	}
	return nil
}

// readFull fills p from src at off; a short read is an error.
func readFull(src io.ReaderAt, p []byte, off int64) error {
	k, err := src.ReadAt(p, off)
	if k == len(p) {
		return nil // io.ReaderAt may say io.EOF with the last bytes
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at offset %d of the source: got %d: %w", len(p), off, k, err)
}

// Copy copies all src.Length bytes of src to the start of dst, which must
// be at least as long (the rest of dst is left as it was), and returns
// once the copy has completed: on a device backend it is a device-to-device
// copy followed by a sync, so a descriptor of dst handed out afterwards
// shows the bytes. src and dst are live regions or ranges inside live
// regions; they must not overlap.
func (a *Arena) Copy(dst, src Region) error {
	a.mu.Lock()
	ds, derr := a.span(dst, 0, src.Length)
	ss, serr := a.span(src, 0, src.Length)
	a.mu.Unlock()
	switch {
	case serr != nil:
		return fmt.Errorf("copy region %v to %v: source: %w", src, dst, serr)
	case derr != nil:
		return fmt.Errorf("copy region %v to %v: destination: %w", src, dst, derr)
	case ds == ss && dst.Offset < src.Offset+src.Length && src.Offset < dst.Offset+src.Length:
		return fmt.Errorf("copy region %v to %v: %w: the ranges overlap", src, dst, ErrInvalid)
	}
	n := src.Length
	switch {
	case ds.mem != nil && ss.mem != nil:
		copy(ds.mem[dst.Offset:dst.Offset+n], ss.mem[src.Offset:src.Offset+n])
		return nil
	case ds.mem == nil && ss.mem == nil:
		if err := ds.seg.(Mover).CopyFrom(ss.seg, src.Offset, dst.Offset, n); err != nil {
			return fmt.Errorf("copy region %v to %v: %w", src, dst, err)
		}
		return nil
	}
	// One backend gives one kind of segment; a mixed pair is a backend bug.
	return fmt.Errorf("copy region %v to %v: %w: one segment is host-mapped and the other is not", src, dst, ErrInvalid)
}
