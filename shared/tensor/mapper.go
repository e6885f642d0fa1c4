package tensor

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Mapper maps the CPU segments descriptors point into and hands out the
// bytes of each tensor without copying. It keeps one mapping per (host_pid,
// segment id): the first descriptor into a segment maps the whole segment,
// later ones reuse it. A read-write descriptor into a segment mapped
// read-only maps it again read-write; earlier slices stay valid.
//
// Every slice a Mapper returns aliases shared memory and is valid until
// Close. Writing through a slice of a read-only descriptor faults. A Mapper
// is safe for concurrent use.
type Mapper struct {
	mu     sync.Mutex
	segs   map[segKey]*mapping
	all    []*mapping // every mapping made, unmapped by Close
	closed bool
}

type segKey struct {
	pid int32
	id  uint32
}

type mapping struct {
	path     string
	data     []byte
	writable bool
}

// NewMapper returns an empty Mapper.
func NewMapper() *Mapper { return &Mapper{segs: make(map[segKey]*mapping)} }

// Bytes returns the nbytes of d's region, mapped read-write when d's access
// is ACCESS_READ_WRITE and read-only otherwise.
func (m *Mapper) Bytes(d *pluginv1.TensorDescriptor) ([]byte, error) {
	if err := Check(d); err != nil {
		return nil, err
	}
	write := d.GetAccess() == pluginv1.Access_ACCESS_READ_WRITE
	b, err := m.Region(d.GetRegion(), d.GetNbytes(), write)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", d.GetName(), err)
	}
	return b, nil
}

// Writable returns d's bytes mapped read-write, refusing a descriptor whose
// access is not ACCESS_READ_WRITE.
func (m *Mapper) Writable(d *pluginv1.TensorDescriptor) ([]byte, error) {
	if d != nil && d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE {
		return nil, fmt.Errorf("tensor %q: access %v: %w", d.GetName(), d.GetAccess(), ErrReadOnly)
	}
	return m.Bytes(d)
}

// Region returns nbytes at the region's offset in its CPU segment. It
// checks that the range lies inside the region and the segment, and refuses
// CUDA regions with ErrCUDALocation.
func (m *Mapper) Region(r *pluginv1.Region, nbytes uint64, write bool) ([]byte, error) {
	if r == nil {
		return nil, fmt.Errorf("nil region: %w", ErrBadDescriptor)
	}
	if c := r.GetCuda(); c != nil {
		return nil, fmt.Errorf("slab %d on device %d: %w", c.GetId(), c.GetDevice(), ErrCUDALocation)
	}
	seg := r.GetCpu()
	if seg == nil {
		return nil, fmt.Errorf("region has no segment: %w", ErrBadDescriptor)
	}
	if nbytes > r.GetLength() {
		return nil, fmt.Errorf("%d bytes in a region of %d: %w", nbytes, r.GetLength(), ErrOutOfBounds)
	}
	end := r.GetOffset() + nbytes
	if end < r.GetOffset() || end > seg.GetSize() {
		return nil, fmt.Errorf("segment %d (%s): bytes [%d, %d+%d) outside its %d bytes: %w",
			seg.GetId(), seg.GetPath(), r.GetOffset(), r.GetOffset(), nbytes, seg.GetSize(), ErrOutOfBounds)
	}
	mp, err := m.segment(seg, write)
	if err != nil {
		return nil, err
	}
	return mp.data[r.GetOffset():end:end], nil
}

func (m *Mapper) segment(seg *pluginv1.CPUSegment, write bool) (*mapping, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("segment %d: %w", seg.GetId(), ErrClosed)
	}
	key := segKey{pid: seg.GetHostPid(), id: seg.GetId()}
	if mp, ok := m.segs[key]; ok && mp.path == seg.GetPath() &&
		uint64(len(mp.data)) == seg.GetSize() && (mp.writable || !write) {
		return mp, nil
	}
	mp, err := mapSegment(seg, write)
	if err != nil {
		return nil, err
	}
	m.segs[key] = mp
	m.all = append(m.all, mp)
	return mp, nil
}

func mapSegment(seg *pluginv1.CPUSegment, write bool) (*mapping, error) {
	size := seg.GetSize()
	if seg.GetPath() == "" {
		return nil, fmt.Errorf("segment %d: empty path: %w", seg.GetId(), ErrBadDescriptor)
	}
	if size == 0 || size > uint64(maxMapSize) {
		return nil, fmt.Errorf("segment %d (%s): size %d: %w", seg.GetId(), seg.GetPath(), size, ErrBadDescriptor)
	}
	flag, prot := os.O_RDONLY, unix.PROT_READ
	if write {
		flag, prot = os.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(seg.GetPath(), flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open segment %d: %w", seg.GetId(), err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat segment %d: %w", seg.GetId(), err)
	}
	// Mapping past the end of the file would SIGBUS on first touch.
	if st.Size() < int64(size) {
		return nil, fmt.Errorf("segment %d (%s): file is %d bytes but the descriptor says %d: %w",
			seg.GetId(), seg.GetPath(), st.Size(), size, ErrOutOfBounds)
	}
	data, err := unix.Mmap(int(f.Fd()), 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap segment %d (%s, %d bytes): %w", seg.GetId(), seg.GetPath(), size, err)
	}
	return &mapping{path: seg.GetPath(), data: data, writable: write}, nil
}

// maxMapSize bounds a segment mapping to what an int can index.
const maxMapSize = int(^uint(0) >> 1)

// Mapped reports how many segment mappings are live.
func (m *Mapper) Mapped() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.all)
}

// Close unmaps every segment. Slices returned earlier must not be used
// afterwards. Close is idempotent.
func (m *Mapper) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	for _, mp := range m.all {
		if err := unix.Munmap(mp.data); err != nil {
			errs = append(errs, fmt.Errorf("munmap %s: %w", mp.path, err))
		}
	}
	m.all, m.segs = nil, nil
	return errors.Join(errs...)
}
