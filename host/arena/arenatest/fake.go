package arenatest

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"sync"

	"github.com/arenahost/arenahost/host/arena"
)

// FakeDevice is a device backend without a device: segments ("slabs") have
// no host mapping (Bytes is nil) and a Location of kind "cuda" with a random
// 64-byte IPC handle, as cuIpcGetMemHandle would give. It lets the slab and
// lease bookkeeping of the CUDA backend run through Run on machines
// without a GPU, and it tracks live slabs for leak checks. Its slabs move
// bytes (arena.Mover) through host memory made on first use, so the
// arena's Read, Write and Copy run on it too.
type FakeDevice struct {
	device int
	// Limit, when non-zero, is the device memory available: Create fails
	// like cuMemAlloc with CUDA_ERROR_OUT_OF_MEMORY past it.
	Limit uint64

	mu     sync.Mutex
	live   map[uint32]*fakeSlab
	bytes  uint64
	closed bool
}

// NewFakeDevice returns a fake device backend for the given ordinal.
func NewFakeDevice(device int) *FakeDevice {
	return &FakeDevice{device: device, live: make(map[uint32]*fakeSlab)}
}

// Name is "cuda-fake".
func (d *FakeDevice) Name() string { return "cuda-fake" }

// Create "allocates" a slab of size bytes.
func (d *FakeDevice) Create(id uint32, size uint64) (arena.Segment, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("fake device %d: closed", d.device)
	}
	if _, dup := d.live[id]; dup {
		return nil, fmt.Errorf("fake device %d: slab %d already exists", d.device, id)
	}
	if d.Limit != 0 && d.bytes+size > d.Limit {
		return nil, fmt.Errorf("fake device %d: cuMemAlloc %d bytes: CUDA_ERROR_OUT_OF_MEMORY (%d of %d bytes in use)",
			d.device, size, d.bytes, d.Limit)
	}
	h := make([]byte, 64)
	if _, err := rand.Read(h); err != nil {
		return nil, fmt.Errorf("fake device %d: ipc handle: %w", d.device, err)
	}
	s := &fakeSlab{d: d, loc: arena.Location{
		Kind: arena.KindCUDA, SegmentID: id, Size: size, HostPID: os.Getpid(), IPCHandle: h, Device: d.device,
	}}
	d.live[id] = s
	d.bytes += size
	return s, nil
}

// Close fails when slabs are still live: the arena must close them first.
func (d *FakeDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	if n := len(d.live); n > 0 {
		return fmt.Errorf("fake device %d: closed with %d slabs (%d bytes) still allocated", d.device, n, d.bytes)
	}
	return nil
}

// Live returns the number of slabs not yet closed.
func (d *FakeDevice) Live() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.live)
}

type fakeSlab struct {
	d   *FakeDevice
	loc arena.Location
	mem []byte // the slab's "device memory", made on first use; guarded by d.mu
}

func (s *fakeSlab) memLocked(off, n uint64) ([]byte, error) {
	if cur, ok := s.d.live[s.loc.SegmentID]; !ok || cur != s {
		return nil, fmt.Errorf("fake device %d: slab %d was freed", s.d.device, s.loc.SegmentID)
	}
	if off > s.loc.Size || n > s.loc.Size-off {
		return nil, fmt.Errorf("fake device %d: slab %d: bytes [%d, %d) past its %d bytes", s.d.device, s.loc.SegmentID, off, off+n, s.loc.Size)
	}
	if s.mem == nil {
		s.mem = make([]byte, s.loc.Size)
	}
	return s.mem[off : off+n], nil
}

// ReadAt "downloads" len(p) bytes at off.
func (s *fakeSlab) ReadAt(p []byte, off uint64) error {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	m, err := s.memLocked(off, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, m)
	return nil
}

// WriteAt "uploads" p to off.
func (s *fakeSlab) WriteAt(ctx context.Context, p []byte, off uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	m, err := s.memLocked(off, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(m, p)
	return nil
}

// CopyFrom copies between two slabs of the same fake device.
func (s *fakeSlab) CopyFrom(src arena.Segment, srcOff, dstOff, n uint64) error {
	fs, ok := src.(*fakeSlab)
	if !ok || fs.d != s.d {
		return fmt.Errorf("fake device %d: copy into slab %d from a segment of another backend (%T)", s.d.device, s.loc.SegmentID, src)
	}
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	from, err := fs.memLocked(srcOff, n)
	if err != nil {
		return err
	}
	to, err := s.memLocked(dstOff, n)
	if err != nil {
		return err
	}
	copy(to, from)
	return nil
}

func (s *fakeSlab) Location() arena.Location { return s.loc }
func (s *fakeSlab) Bytes() []byte            { return nil }

func (s *fakeSlab) Close() error {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if cur, ok := s.d.live[s.loc.SegmentID]; ok && cur == s {
		delete(s.d.live, s.loc.SegmentID)
		s.d.bytes -= s.loc.Size
	}
	return nil
}
