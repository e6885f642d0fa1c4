package arena

import (
	"context"
	"io"
)

// Kinds of memory a Location can point at.
const (
	KindCPU  = "cpu"  // a shared-memory file another process maps (memfd or /dev/shm)
	KindCUDA = "cuda" // a device allocation another process opens by its IPC handle
)

// Location says where a segment lives and how another process reaches it.
// It is what the host puts in a descriptor next to the region's offset
// (protocol messages CPUSegment and CUDASlab).
type Location struct {
	Kind      string // KindCPU or KindCUDA
	SegmentID uint32 // the arena's id for the segment; never reused while the arena lives
	// Path is the file a process on this machine opens and mmaps (MAP_SHARED)
	// from offset 0 for Size bytes: /proc/<HostPID>/fd/<fd> for a memfd
	// segment, a file under /dev/shm otherwise. Empty for device memory.
	Path      string
	Size      uint64 // bytes in the segment
	HostPID   int    // the process that owns the segment
	IPCHandle []byte // device memory: the 64-byte CUipcMemHandle of the slab's base
	Device    int    // device memory: the device ordinal
}

// Backend provides raw segments (shared-memory files, device slabs) for the
// arena to sub-allocate. The arena serializes all calls to one Backend, so
// implementations need no locking of their own for the arena's sake.
// arenatest.Run is the conformance suite every backend must pass.
type Backend interface {
	// Name identifies the backend in stats and logs ("cpu-memfd", "cpu-shm", "cuda").
	Name() string
	// Create makes a segment of exactly size bytes (a multiple of PageSize)
	// with the given id. Its memory reads as zero.
	Create(id uint32, size uint64) (Segment, error)
	// Close releases what the backend holds beyond its segments (for
	// example its /dev/shm directory). The arena closes every segment first.
	Close() error
}

// Segment is one backend allocation.
type Segment interface {
	// Location describes the segment for another process. Its Size is the
	// size passed to Create and its SegmentID the id passed to Create.
	Location() Location
	// Bytes is the host's own mapping of the whole segment, or nil when
	// the host cannot address the memory directly (device memory); such a
	// segment implements Mover.
	Bytes() []byte
	// Close unmaps and releases the segment; a second call does nothing.
	Close() error
}

// Mover is implemented by segments the host cannot map (their Bytes is
// nil, device slabs): the arena's Read, Write and Copy move bytes through
// it. Segments with a host mapping need not implement it; the arena copies
// through Bytes for them. Offsets are from the segment's start; the arena
// has checked every range against a live region before calling.
type Mover interface {
	// ReadAt copies len(p) bytes at off into p, after the segment's
	// pending work (queued kernels, copies) has completed.
	ReadAt(p []byte, off uint64) error
	// WriteAt copies p to off and returns once the bytes are in place.
	WriteAt(ctx context.Context, p []byte, off uint64) error
	// CopyFrom copies n bytes at srcOff of src, a segment of the same
	// backend, to dstOff of this segment, and returns once the copy has
	// completed (a later ReadAt, or a reader in another process, sees it).
	CopyFrom(src Segment, srcOff, dstOff, n uint64) error
}

// Discarder is implemented by segments whose memory can be given back to
// the system while the segment lives: the CPU backend's shared-memory
// files, where Discard punches a hole in the file (its pages leave the page
// cache and every process's mapping, the host's and the plugins'). The
// arena calls it on free ranges only (see the package doc, "Returning
// memory"), with off and n multiples of PageSize. Afterwards the range
// reads as zero everywhere and costs no memory until it is written again.
// An error wrapping errors.ErrUnsupported makes the arena stop asking that
// segment.
type Discarder interface {
	Discard(off, n uint64) error
}

// Filler is implemented by Mover segments that can fill a range straight
// from a reader: each chunk is read from the reader into the segment's own
// transfer buffer (a device's pinned staging memory) and moved from there,
// so the host copies every byte once instead of twice (into a caller's
// buffer, then into the staging buffer). The arena's WriteFrom uses it
// when a segment has it and otherwise reads through a bounded buffer into
// WriteAt.
type Filler interface {
	// WriteFrom copies n bytes of src, from offset srcOff, to off and
	// returns once the bytes are in place. A short read from src is an
	// error (io.ErrUnexpectedEOF when src gives none). It checks ctx
	// between chunks.
	WriteFrom(ctx context.Context, src io.ReaderAt, srcOff, n int64, off uint64) error
}
