package gpusim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/arenahost/arenahost/shared/gpu"
)

// DefaultCapacity is the memory a Device from New reports and allows.
const DefaultCapacity = 16 << 30

// kind is what a mapping is.
type kind int

const (
	kindSlab    kind = iota // Alloc: a memfd this device owns
	kindScratch             // MemAlloc: anonymous memory
	kindIPC                 // OpenIPC: another process's slab
)

func (k kind) String() string {
	switch k {
	case kindSlab:
		return "slab"
	case kindScratch:
		return "scratch buffer"
	default:
		return "slab opened by handle"
	}
}

// mapping is one live (or recently freed) range of simulated device memory.
type mapping struct {
	kind kind
	base gpu.DevicePtr
	size uint64
	mem  []byte // the mmap'd bytes, len(mem) == size
	fd   int    // kindSlab: the memfd, -1 otherwise
	key  ipcKey // kindIPC: the opened handle
}

type ipcKey struct{ pid, fd uint32 }

// op is one queued stream operation.
type op struct {
	what string // for errors: "nf4_fuse", "copy", "zero"
	run  func(d *Device) error
}

// maxFreed bounds the record of freed ranges kept to name a stale pointer.
const maxFreed = 256

// Device is one simulated GPU. It is safe for concurrent use: one mutex
// guards the memory table and the queue, and queued work runs on the
// goroutine that forces it (Sync, Download, …).
type Device struct {
	ordinal  int
	capacity uint64

	mu     sync.Mutex
	maps   []*mapping // live, sorted by base
	freed  []*mapping // most recent last, mem nil
	opened map[ipcKey]gpu.DevicePtr
	used   uint64 // bytes of slabs and scratch
	queue  []op
	closed bool
}

var memfdSerial atomic.Uint64

// New returns a simulated device with DefaultCapacity bytes of memory.
func New(ordinal int) *Device { return NewCapacity(ordinal, DefaultCapacity) }

// NewCapacity returns a simulated device whose slabs and scratch may use
// at most capacity bytes together (Alloc beyond it fails like
// cuMemAlloc's CUDA_ERROR_OUT_OF_MEMORY).
func NewCapacity(ordinal int, capacity uint64) *Device {
	return &Device{ordinal: ordinal, capacity: capacity, opened: map[ipcKey]gpu.DevicePtr{}}
}

// Device is the ordinal.
func (d *Device) Device() int { return d.ordinal }

func (d *Device) errClosed(step string) error {
	return fmt.Errorf("%s: simulated device %d: closed", step, d.ordinal)
}

// Alloc allocates a zeroed slab of size bytes (a shared memfd mapping) and
// its IPC handle.
func (d *Device) Alloc(size uint64) (gpu.Slab, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return gpu.Slab{}, d.errClosed("alloc")
	}
	if err := d.reserveLocked("alloc", size); err != nil {
		return gpu.Slab{}, err
	}
	name := fmt.Sprintf("arenahost-sim-%d", memfdSerial.Add(1))
	fd, err := memfd(name)
	if err != nil {
		return gpu.Slab{}, fmt.Errorf("alloc %d bytes: %w", size, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return gpu.Slab{}, fmt.Errorf("alloc %d bytes: ftruncate %s: %w", size, name, err)
	}
	mem, err := mmap(fd, size, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return gpu.Slab{}, fmt.Errorf("alloc %d bytes: mmap %s: %w", size, name, err)
	}
	m := &mapping{kind: kindSlab, base: addr(mem), size: size, mem: mem, fd: fd}
	d.insertLocked(m)
	d.used += size
	return gpu.Slab{Ptr: m.base, Size: size, Handle: encodeHandle(uint32(os.Getpid()), uint32(fd), size)}, nil
}

func (d *Device) reserveLocked(step string, size uint64) error {
	switch {
	case size == 0:
		return fmt.Errorf("%s: 0 bytes", step)
	case size > uint64(maxInt) || size > d.capacity-d.used || d.used > d.capacity:
		return fmt.Errorf("%s %d bytes: out of memory (simulated device %d: %d of %d bytes free)",
			step, size, d.ordinal, d.capacity-min(d.capacity, d.used), d.capacity)
	}
	return nil
}

const maxInt = int(^uint(0) >> 1)

func addr(b []byte) gpu.DevicePtr { return gpu.DevicePtr(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }

// Free runs the queued work, then releases a slab from Alloc.
func (d *Device) Free(s gpu.Slab) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("free")
	}
	qerr := d.runLocked()
	m, err := d.ownedLocked("free", kindSlab, s.Ptr)
	if err != nil {
		return errors.Join(qerr, err)
	}
	if m.size != s.Size {
		return errors.Join(qerr, fmt.Errorf("free slab %#x: size %d, allocated %d", s.Ptr, s.Size, m.size))
	}
	return errors.Join(qerr, d.releaseLocked(m))
}

// MemAlloc allocates n bytes of private scratch memory (zeroed, though the
// driver promises nothing).
func (d *Device) MemAlloc(n uint64) (gpu.DevicePtr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, d.errClosed("mem alloc")
	}
	if err := d.reserveLocked("mem alloc", n); err != nil {
		return 0, err
	}
	mem, err := mmap(-1, n, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, fmt.Errorf("mem alloc %d bytes: mmap: %w", n, err)
	}
	m := &mapping{kind: kindScratch, base: addr(mem), size: n, mem: mem, fd: -1}
	d.insertLocked(m)
	d.used += n
	return m.base, nil
}

// MemFree runs the queued work, then frees memory from MemAlloc.
func (d *Device) MemFree(p gpu.DevicePtr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("mem free")
	}
	qerr := d.runLocked()
	m, err := d.ownedLocked("mem free", kindScratch, p)
	if err != nil {
		return errors.Join(qerr, err)
	}
	return errors.Join(qerr, d.releaseLocked(m))
}

// OpenIPC maps another process's slab by its handle.
func (d *Device) OpenIPC(h [gpu.HandleSize]byte) (gpu.DevicePtr, error) {
	hd, err := decodeHandle(h)
	if err != nil {
		return 0, fmt.Errorf("open ipc handle: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, d.errClosed("open ipc handle")
	}
	key := ipcKey{pid: hd.pid, fd: hd.fd}
	if p, ok := d.opened[key]; ok {
		return 0, fmt.Errorf("open ipc handle of pid %d fd %d: already open at %#x in this process (open a handle once and cache it, as gpu.SlabCache does)", hd.pid, hd.fd, p)
	}
	if int(hd.pid) == os.Getpid() {
		return 0, fmt.Errorf("open ipc handle of pid %d fd %d: the handle was made by this process; the driver opens only other processes' allocations", hd.pid, hd.fd)
	}
	mem, err := mapHandle(hd)
	if err != nil {
		return 0, fmt.Errorf("open ipc handle: %w", err)
	}
	m := &mapping{kind: kindIPC, base: addr(mem), size: hd.size, mem: mem, fd: -1, key: key}
	d.insertLocked(m)
	d.opened[key] = m.base
	return m.base, nil
}

// CloseIPC runs the queued work, then unmaps a slab opened with OpenIPC.
func (d *Device) CloseIPC(p gpu.DevicePtr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("close ipc handle")
	}
	qerr := d.runLocked()
	m, err := d.ownedLocked("close ipc handle", kindIPC, p)
	if err != nil {
		return errors.Join(qerr, err)
	}
	return errors.Join(qerr, d.releaseLocked(m))
}

// Upload runs the queued work, then copies src to dst.
func (d *Device) Upload(ctx context.Context, dst gpu.DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("upload %d bytes to %#x: %w", len(src), dst, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("upload")
	}
	if err := d.runLocked(); err != nil {
		return fmt.Errorf("upload %d bytes to %#x: pending work: %w", len(src), dst, err)
	}
	b, err := d.spanLocked(dst, uint64(len(src)))
	if err != nil {
		return fmt.Errorf("upload %d bytes: destination %w", len(src), err)
	}
	copy(b, src)
	return nil
}

// Download runs the queued work, then copies len(dst) bytes from src.
func (d *Device) Download(dst []byte, src gpu.DevicePtr) error {
	if len(dst) == 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("download")
	}
	if err := d.runLocked(); err != nil {
		return fmt.Errorf("download %d bytes from %#x: pending work: %w", len(dst), src, err)
	}
	b, err := d.spanLocked(src, uint64(len(dst)))
	if err != nil {
		return fmt.Errorf("download %d bytes: source %w", len(dst), err)
	}
	copy(dst, b)
	return nil
}

// CopyAsync queues a device-to-device copy of n bytes. The ranges are
// checked now and again when the copy runs.
func (d *Device) CopyAsync(dst, src gpu.DevicePtr, n uint64) error {
	if n == 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("copy")
	}
	run := func(d *Device) error {
		s, err := d.spanLocked(src, n)
		if err != nil {
			return fmt.Errorf("copy %d bytes: source %w", n, err)
		}
		t, err := d.spanLocked(dst, n)
		if err != nil {
			return fmt.Errorf("copy %d bytes: destination %w", n, err)
		}
		copy(t, s)
		return nil
	}
	return d.enqueueLocked(op{what: "copy", run: run}, func() error {
		if _, err := d.spanLocked(src, n); err != nil {
			return fmt.Errorf("copy %d bytes: source %w", n, err)
		}
		if _, err := d.spanLocked(dst, n); err != nil {
			return fmt.Errorf("copy %d bytes: destination %w", n, err)
		}
		return nil
	})
}

// Zero queues setting n bytes at p to zero.
func (d *Device) Zero(p gpu.DevicePtr, n uint64) error {
	if n == 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("zero")
	}
	run := func(d *Device) error {
		b, err := d.spanLocked(p, n)
		if err != nil {
			return fmt.Errorf("zero %d bytes: %w", n, err)
		}
		clear(b)
		return nil
	}
	return d.enqueueLocked(op{what: "zero", run: run}, func() error {
		if _, err := d.spanLocked(p, n); err != nil {
			return fmt.Errorf("zero %d bytes: %w", n, err)
		}
		return nil
	})
}

// Sync runs everything queued, in order. The first failing operation's
// error is returned and the operations queued after it are dropped (a CUDA
// stream error is sticky; the simulator stays usable).
func (d *Device) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed("sync")
	}
	return d.runLocked()
}

// Pending is the number of queued operations (for tests).
func (d *Device) Pending() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.queue)
}

// MemInfo returns the simulated free and total memory.
func (d *Device) MemInfo() (free, total uint64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, 0, d.errClosed("mem info")
	}
	return d.capacity - min(d.capacity, d.used), d.capacity, nil
}

// Live returns the number of live slabs, scratch allocations and opened
// handles: a test checks that none leaked.
func (d *Device) Live() (slabs, scratch, opened int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range d.maps {
		switch m.kind {
		case kindSlab:
			slabs++
		case kindScratch:
			scratch++
		case kindIPC:
			opened++
		}
	}
	return slabs, scratch, opened
}

// Close runs the queued work, then frees every slab and scratch buffer and
// unmaps every opened handle. Later calls fail; a second Close is a no-op.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	var errs []error
	if err := d.runLocked(); err != nil {
		errs = append(errs, fmt.Errorf("pending work: %w", err))
	}
	for len(d.maps) > 0 {
		if err := d.releaseLocked(d.maps[len(d.maps)-1]); err != nil {
			errs = append(errs, err)
		}
	}
	d.closed = true
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close simulated device %d: %w", d.ordinal, err)
	}
	return nil
}

// enqueueLocked checks an operation's ranges now, so a bad launch fails
// where it is made, and queues it.
func (d *Device) enqueueLocked(o op, check func() error) error {
	if err := check(); err != nil {
		return err
	}
	d.queue = append(d.queue, o)
	return nil
}

// runLocked runs the queue in order; the first error drops the rest.
func (d *Device) runLocked() error {
	q := d.queue
	d.queue = nil
	for i, o := range q {
		if err := o.run(d); err != nil {
			if left := len(q) - i - 1; left > 0 {
				return fmt.Errorf("queued %s: %w (%d later operations dropped)", o.what, err, left)
			}
			return fmt.Errorf("queued %s: %w", o.what, err)
		}
	}
	return nil
}

func (d *Device) insertLocked(m *mapping) {
	i := sort.Search(len(d.maps), func(i int) bool { return d.maps[i].base >= m.base })
	d.maps = append(d.maps, nil)
	copy(d.maps[i+1:], d.maps[i:])
	d.maps[i] = m
	// An address reused by a new mapping is no longer a freed one.
	d.freed = slicesDeleteFunc(d.freed, func(f *mapping) bool { return overlaps(f, m.base, m.size) })
}

func slicesDeleteFunc(s []*mapping, del func(*mapping) bool) []*mapping {
	out := s[:0]
	for _, m := range s {
		if !del(m) {
			out = append(out, m)
		}
	}
	clear(s[len(out):])
	return out
}

func overlaps(m *mapping, p gpu.DevicePtr, n uint64) bool {
	return uint64(p) < uint64(m.base)+m.size && uint64(m.base) < uint64(p)+n
}

// ownedLocked finds the live mapping of kind k that starts at p.
func (d *Device) ownedLocked(step string, k kind, p gpu.DevicePtr) (*mapping, error) {
	m := d.findLocked(p)
	switch {
	case m == nil:
		return nil, fmt.Errorf("%s %#x: %s", step, p, d.unknownLocked(p))
	case m.base != p:
		return nil, fmt.Errorf("%s %#x: not the start of a %s (it lies %d bytes into the one at %#x)", step, p, k, p-m.base, m.base)
	case m.kind != k:
		return nil, fmt.Errorf("%s %#x: a %s, not a %s", step, p, m.kind, k)
	}
	return m, nil
}

func (d *Device) releaseLocked(m *mapping) error {
	i := sort.Search(len(d.maps), func(i int) bool { return d.maps[i].base >= m.base })
	if i < len(d.maps) && d.maps[i] == m {
		d.maps = append(d.maps[:i], d.maps[i+1:]...)
	}
	var errs []error
	if err := munmap(m.mem); err != nil {
		errs = append(errs, fmt.Errorf("munmap %s %#x: %w", m.kind, m.base, err))
	}
	m.mem = nil
	switch m.kind {
	case kindSlab:
		if err := unix.Close(m.fd); err != nil {
			errs = append(errs, fmt.Errorf("close memfd of slab %#x: %w", m.base, err))
		}
		d.used -= m.size
	case kindScratch:
		d.used -= m.size
	case kindIPC:
		delete(d.opened, m.key)
	}
	d.freed = append(d.freed, m)
	if len(d.freed) > maxFreed {
		d.freed = append(d.freed[:0], d.freed[len(d.freed)-maxFreed:]...)
	}
	return errors.Join(errs...)
}

// findLocked returns the live mapping containing p, or nil.
func (d *Device) findLocked(p gpu.DevicePtr) *mapping {
	i := sort.Search(len(d.maps), func(i int) bool { return d.maps[i].base > p }) - 1
	if i >= 0 && p < d.maps[i].base+gpu.DevicePtr(d.maps[i].size) {
		return d.maps[i]
	}
	return nil
}

func (d *Device) unknownLocked(p gpu.DevicePtr) string {
	for i := len(d.freed) - 1; i >= 0; i-- {
		if f := d.freed[i]; overlaps(f, p, 1) {
			return fmt.Sprintf("in a %s of %d bytes at %#x that was already freed", f.kind, f.size, f.base)
		}
	}
	return "not in any live allocation"
}

// spanLocked returns the n bytes of device memory at p, or an error naming
// the address ("%#x + n bytes: …") when they are not all inside one live
// mapping.
func (d *Device) spanLocked(p gpu.DevicePtr, n uint64) ([]byte, error) {
	m := d.findLocked(p)
	if m == nil {
		return nil, fmt.Errorf("%#x + %d bytes: %s", p, n, d.unknownLocked(p))
	}
	off := uint64(p - m.base)
	if n > m.size-off {
		return nil, fmt.Errorf("%#x + %d bytes: runs %d bytes past the end of the %s of %d bytes at %#x",
			p, n, n-(m.size-off), m.kind, m.size, m.base)
	}
	return m.mem[off : off+n : off+n], nil
}
