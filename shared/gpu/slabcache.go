package gpu

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// IPCOpener maps another process's device allocation by its IPC handle
// (the cuda build's Device: cuIpcOpenMemHandle / cuIpcCloseMemHandle).
type IPCOpener interface {
	OpenIPC(h [HandleSize]byte) (DevicePtr, error)
	CloseIPC(p DevicePtr) error
}

// SlabCache is the plugin side of the device arena: it opens each slab the
// host names once per process and caches the mapping (the driver allows
// one open per context and device per process), and turns a descriptor's
// region into a device address. Close it only after every use of the
// addresses it returned. Safe for concurrent use.
type SlabCache struct {
	o IPCOpener

	mu     sync.Mutex
	slabs  map[slabKey]*openSlab
	closed bool
}

type slabKey struct {
	hostPID int
	id      uint32
}

type openSlab struct {
	handle [HandleSize]byte
	base   DevicePtr
	size   uint64
}

// NewSlabCache returns an empty cache over o.
func NewSlabCache(o IPCOpener) *SlabCache {
	return &SlabCache{o: o, slabs: map[slabKey]*openSlab{}}
}

// Addr returns the device address of a region on a CUDA slab, opening the
// slab on first use.
func (c *SlabCache) Addr(r *pluginv1.Region) (DevicePtr, error) {
	loc, off, err := RegionAddr(r)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, fmt.Errorf("cuda slab %d: slab cache closed", loc.ID)
	}
	key := slabKey{hostPID: loc.HostPID, id: loc.ID}
	if s, ok := c.slabs[key]; ok {
		if s.handle != loc.Handle || s.size != loc.Size {
			return 0, fmt.Errorf("cuda slab %d of host %d: handle or size changed since it was opened", loc.ID, loc.HostPID)
		}
		return s.base + DevicePtr(off), nil
	}
	s := &openSlab{size: loc.Size, handle: loc.Handle}
	base, err := c.o.OpenIPC(s.handle)
	if err != nil {
		return 0, fmt.Errorf("cuda slab %d of host %d: open: %w", loc.ID, loc.HostPID, err)
	}
	s.base = base
	c.slabs[key] = s
	return base + DevicePtr(off), nil
}

// Open returns the number of slabs opened.
func (c *SlabCache) Open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.slabs)
}

// Close closes every opened slab; the cache refuses use afterwards.
func (c *SlabCache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	keys := make([]slabKey, 0, len(c.slabs))
	for k := range c.slabs {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b slabKey) int { return int(a.id) - int(b.id) })
	var errs []error
	for _, k := range keys {
		if err := c.o.CloseIPC(c.slabs[k].base); err != nil {
			errs = append(errs, fmt.Errorf("cuda slab %d: close: %w", k.id, err))
		}
		delete(c.slabs, k)
	}
	return errors.Join(errs...)
}
