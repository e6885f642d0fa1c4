package cuda

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/gpu"
)

// HandleSize is the size of a CUipcMemHandle (CU_IPC_HANDLE_SIZE).
const HandleSize = gpu.HandleSize

// DevicePtr is a device address (CUdeviceptr).
type DevicePtr = gpu.DevicePtr

// Slab is one device allocation made by an Allocator.
type Slab = gpu.Slab

// Allocator is the device memory under a Backend. The cuda build's
// DeviceAllocator uses cuMemAlloc and cuIpcGetMemHandle; tests use a fake
// that records allocations and frees.
type Allocator interface {
	// Device is the device ordinal the memory lives on.
	Device() int
	// Alloc allocates size bytes, zeroes them, and returns the slab with
	// its IPC handle once the zeroing has completed.
	Alloc(size uint64) (Slab, error)
	// Free releases a slab returned by Alloc.
	Free(s Slab) error
}

// Backend is the device backend of the arena: every segment is one slab
// of its Allocator. Use it with arena.Config{RetainEmpty: true}.
//
// Legacy CUDA IPC handles do not keep memory alive: freeing a slab while
// another process has it open is undefined behaviour. So the Backend
// counts, per slab, the holders (plugin generations, named by their arena
// owner) that may have it open. Opened records one when a descriptor on
// the slab is handed to a holder; Released drops a holder's opens when it
// closed the slab or its process exited. A segment the arena closes while
// it is still open stays allocated and is freed by the Released call that
// drops its last holder.
type Backend struct {
	name  string
	alloc Allocator
	mv    Mover // nil when alloc moves no bytes (then Read/Write/Copy fail)
	log   *slog.Logger
	chunk int // bytes per upload: the staging buffer's size

	stageMu     sync.Mutex // one write stages at a time
	stage       []byte     // the staging buffer, made on first write (staging)
	stageFree   func() error
	stagePinned bool // stage is page-locked memory (fixed at b.chunk bytes)
	stageTried  bool // the pinned allocation was tried

	mu      sync.Mutex
	slabs   map[uint32]*slab // live and closing slabs, by segment id
	holders map[arena.Owner]map[uint32]struct{}
	closed  bool
}

type slab struct {
	id      uint32
	s       Slab
	holders map[arena.Owner]struct{}
	closing bool // the arena closed the segment; free when no holder is left
	freed   bool
}

// NewBackend returns a backend over alloc. A nil logger means
// slog.Default(). When alloc is also a Mover (a Device), the segments move
// bytes (arena.Mover) and fill from readers (arena.Filler), and the
// arena's Read, Write, WriteFrom and Copy work on them; uploads go through
// a staging buffer of at most DefaultStagingBytes, pinned when the device
// offers pinned memory (the cuda build's gpu.Device), ordinary host memory
// otherwise (cuda-sim), so every device takes the same host path.
func NewBackend(alloc Allocator, log *slog.Logger) *Backend {
	if log == nil {
		log = slog.Default()
	}
	mv, _ := alloc.(Mover)
	return &Backend{name: "cuda", alloc: alloc, mv: mv, log: log, chunk: DefaultStagingBytes,
		slabs: map[uint32]*slab{}, holders: map[arena.Owner]map[uint32]struct{}{}}
}

// Name is "cuda" unless SetName changed it.
func (b *Backend) Name() string { return b.name }

// SetName names the backend in the arena's stats and logs (the server says
// "cuda-sim" for the simulated device). Call it before arena.New.
func (b *Backend) SetName(name string) { b.name = name }

// Create allocates a slab for segment id.
func (b *Backend) Create(id uint32, size uint64) (arena.Segment, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("cuda backend: create slab %d: backend closed", id)
	}
	if _, dup := b.slabs[id]; dup {
		return nil, fmt.Errorf("cuda backend: create slab %d: id in use", id)
	}
	s, err := b.alloc.Alloc(size)
	if err != nil {
		return nil, fmt.Errorf("cuda backend: create slab %d of %d bytes on device %d: %w", id, size, b.alloc.Device(), err)
	}
	if s.Size != size {
		_ = b.alloc.Free(s)
		return nil, fmt.Errorf("cuda backend: create slab %d: allocator returned %d bytes, asked %d", id, s.Size, size)
	}
	sl := &slab{id: id, s: s, holders: map[arena.Owner]struct{}{}}
	b.slabs[id] = sl
	return &segment{b: b, sl: sl}, nil
}

// Opened records that holder may have segment id open (a descriptor on it
// was handed to the holder). It fails for an unknown or closing slab: a
// closing slab must not be handed out again.
func (b *Backend) Opened(holder arena.Owner, id uint32) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	sl, ok := b.slabs[id]
	if !ok || sl.freed {
		return fmt.Errorf("cuda backend: open slab %d by %s: no such slab", id, holder)
	}
	if sl.closing {
		return fmt.Errorf("cuda backend: open slab %d by %s: slab is being closed", id, holder)
	}
	sl.holders[holder] = struct{}{}
	m := b.holders[holder]
	if m == nil {
		m = map[uint32]struct{}{}
		b.holders[holder] = m
	}
	m[id] = struct{}{}
	return nil
}

// Released drops holder's opens of the given slabs, or of every slab when
// ids is empty (the holder's process exited: the driver has dropped its
// imports). Closing slabs left without a holder are freed; the first free
// error is returned after all are tried.
func (b *Backend) Released(holder arena.Owner, ids ...uint32) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := b.holders[holder]
	if len(ids) == 0 {
		for id := range m {
			ids = append(ids, id)
		}
		slices.Sort(ids)
	}
	var first error
	for _, id := range ids {
		delete(m, id)
		sl, ok := b.slabs[id]
		if !ok {
			continue
		}
		delete(sl.holders, holder)
		if sl.closing && len(sl.holders) == 0 {
			if err := b.freeLocked(sl); err != nil && first == nil {
				first = err
			}
		}
	}
	if len(m) == 0 {
		delete(b.holders, holder)
	}
	return first
}

// Holders returns the holders that have segment id open, sorted.
func (b *Backend) Holders(id uint32) []arena.Owner {
	b.mu.Lock()
	defer b.mu.Unlock()
	sl, ok := b.slabs[id]
	if !ok {
		return nil
	}
	out := make([]arena.Owner, 0, len(sl.holders))
	for h := range sl.holders {
		out = append(out, h)
	}
	slices.Sort(out)
	return out
}

// Pending returns the ids of slabs the arena closed that stay allocated
// because a holder still has them open, sorted.
func (b *Backend) Pending() []uint32 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []uint32
	for id, sl := range b.slabs {
		if sl.closing && !sl.freed {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Ptr returns the device address of segment id (for the host's own
// kernels and copies).
func (b *Backend) Ptr(id uint32) (DevicePtr, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	sl, ok := b.slabs[id]
	if !ok || sl.freed || sl.closing {
		return 0, fmt.Errorf("cuda backend: slab %d: no such slab", id)
	}
	return sl.s.Ptr, nil
}

// Close marks the backend closed and frees the staging buffer. Slabs still
// held by a live holder are not freed (that would be undefined behaviour
// for the holder); Close reports them, and a later Released still frees
// them.
func (b *Backend) Close() error {
	b.stageMu.Lock()
	var stageErr error
	if b.stageFree != nil {
		stageErr = b.stageFree()
	}
	b.stage, b.stageFree, b.stagePinned = nil, nil, false
	b.stageTried = true
	b.stageMu.Unlock()
	if stageErr != nil {
		b.log.Warn("free the pinned staging buffer", "err", stageErr)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	var held []string
	ids := make([]uint32, 0, len(b.slabs))
	for id := range b.slabs {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		sl := b.slabs[id]
		if sl.freed {
			continue
		}
		hs := make([]string, 0, len(sl.holders))
		for h := range sl.holders {
			hs = append(hs, string(h))
		}
		slices.Sort(hs)
		held = append(held, fmt.Sprintf("slab %d (%d bytes) open by %s", id, sl.s.Size, strings.Join(hs, ", ")))
	}
	if len(held) > 0 {
		return fmt.Errorf("cuda backend: close: %d slabs still open, left allocated: %s", len(held), strings.Join(held, "; "))
	}
	return nil
}

func (b *Backend) freeLocked(sl *slab) error {
	if sl.freed {
		return nil
	}
	sl.freed = true
	delete(b.slabs, sl.id)
	if err := b.alloc.Free(sl.s); err != nil {
		return fmt.Errorf("cuda backend: free slab %d (%d bytes): %w", sl.id, sl.s.Size, err)
	}
	return nil
}

// segment is one slab as the arena sees it.
type segment struct {
	b  *Backend
	sl *slab
}

func (s *segment) Location() arena.Location {
	h := s.sl.s.Handle
	return arena.Location{
		Kind: arena.KindCUDA, SegmentID: s.sl.id, Size: s.sl.s.Size, HostPID: os.Getpid(),
		IPCHandle: h[:], Device: s.b.alloc.Device(),
	}
}

// Bytes is nil: the host cannot address device memory directly; the
// segment moves bytes instead (ReadAt, WriteAt, CopyFrom in mover.go).
func (s *segment) Bytes() []byte { return nil }

// Close frees the slab, or defers the free while a holder has it open.
func (s *segment) Close() error {
	b := s.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.sl.closing || s.sl.freed {
		return nil
	}
	s.sl.closing = true
	if n := len(s.sl.holders); n > 0 {
		b.log.Info("cuda slab closed while open; free deferred", "slab", s.sl.id, "bytes", s.sl.s.Size, "holders", n)
		return nil
	}
	return b.freeLocked(s.sl)
}

// NewArena makes an arena on a Backend over alloc. It sets RetainEmpty:
// a device arena keeps its slabs until Close, since plugins address them by
// IPC handle.
func NewArena(ctx context.Context, alloc Allocator, cfg arena.Config) (*arena.Arena, *Backend, error) {
	return NewArenaNamed(ctx, "cuda", alloc, cfg)
}

// NewArenaNamed is NewArena with the backend named name in the arena's
// stats and logs ("cuda-sim" for the simulated device).
func NewArenaNamed(ctx context.Context, name string, alloc Allocator, cfg arena.Config) (*arena.Arena, *Backend, error) {
	cfg.RetainEmpty = true
	b := NewBackend(alloc, cfg.Logger)
	b.SetName(name)
	a, err := arena.New(ctx, b, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("cuda arena on device %d: %w", alloc.Device(), err)
	}
	return a, b, nil
}
