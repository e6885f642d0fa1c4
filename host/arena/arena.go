// Package arena owns the host's memory arena: segments obtained from a
// backend (shared-memory files another process can map, or device slabs
// another process opens by IPC handle), sub-allocated into regions that are
// leased to an owner (the host or one plugin generation) and named in
// descriptors by (segment, offset, length, generation).
//
// # Sub-allocation
//
// Every region starts on an Alignment (256-byte) boundary and occupies its
// length rounded up to Alignment. Free space is kept as extents: a
// size-ordered treap of every free extent in every segment gives best fit
// (the smallest extent that fits; ties go to the lowest segment, then the
// lowest offset) in O(log n), and per-segment maps from extent start and
// end make coalescing with both neighbours O(1) on free. Best fit is chosen
// over first fit because the arena mixes a few very large tensors (model
// weights) with many small ones (LoRA factors, journals): best fit keeps
// the large extents whole for the next large tensor at the same cost.
//
// When no extent fits, the arena grows by one segment of Config.SegmentSize,
// or of the request rounded up to PageSize when that is larger (a large
// tensor gets a segment of its own), as long as the total stays within
// Config.Capacity. Past it, Alloc returns a *CapacityError (ErrCapacity)
// saying what was asked, what is free and what would fit.
//
// Empty segments: when a free empties a segment, the arena keeps it as a
// spare only if it is the only empty segment of the standard size; every
// other empty segment (oversize ones included) goes back to the backend at
// once. So a full arena that drops to empty keeps exactly one standard
// segment, and alloc/free churn at a segment boundary does not create and
// destroy segments each time. Config.RetainEmpty keeps every segment until
// Close instead: device backends need it, because a legacy CUDA IPC handle
// does not keep a slab alive while a plugin still has it open.
//
// # Returning memory
//
// Freed bytes go back to the kernel, not only to the arena: on backends
// whose segments are Discarders (the CPU backend, memfd and /dev/shm
// alike), a free punches a hole in the segment's file over the whole pages
// of the coalesced free extent, as soon as that extent spans at least
// DiscardMin bytes of whole pages. So the host's RSS (and the plugins')
// falls back when a model is unloaded, also for the spare segment and for
// segments that stay because other regions live in them. The cost is
// bounded: the arena keeps every free extent of at least DiscardMin whole
// pages discarded, so a free punches only the pages it newly frees plus
// those of smaller neighbours it merges with, never the whole extent
// again; frees that leave smaller extents make no system call. The punch
// happens under the arena's lock, before the range can be allocated
// again, and only over free bytes: pages shared with a live region are
// left alone. A discarded range reads as zero, in the host and in every
// process that maps the segment; that is what a new region there sees
// (the contract stays "zero on first use, reused bytes not cleared").
// A process still reading a freed range through an old mapping sees zeros
// instead of the old bytes; its descriptor is stale either way. Device
// backends (cuda, cuda-sim) do not discard: their slabs stay as they are.
//
// # Generations and leases
//
// Each allocation, and each Transfer, takes the next value of one 64-bit
// counter, so a descriptor names exactly one lease: after the region is
// freed, reclaimed or handed to another owner, the old descriptor is
// rejected with ErrStale instead of aliasing new data. Owners are strings:
// HostOwner, or PluginOwner(name, generation) for the regions a plugin
// generation asked for; ReleaseOwner reclaims all of a dead owner's regions.
//
// # Moving bytes
//
// Bytes returns a view into the host's mapping; device memory has none
// (ErrNoHostView). Read, Write and Copy move bytes on every backend: through
// the mapping, or through the segment's Mover (downloads, staged uploads,
// device-to-device copies that have completed when Copy returns). Mapped
// says which kind the arena is. WriteFrom fills a region from an
// io.ReaderAt (a mapped file) with no buffer of the caller's: on a device
// segment that is a Filler each chunk is read straight into the device's
// staging buffer, one host copy where Write of a filled buffer makes two.
//
// All methods are safe for concurrent use. Bytes returns a view into the
// host's mapping that stays valid while the region is live; using it after
// Free is a use-after-free the arena cannot detect. Read, Write, WriteFrom
// and Copy likewise need the region kept live until they return.
package arena

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
)

// Alignment is the alignment of every region's offset, and the unit
// regions are rounded up to.
const Alignment = 256

// PageSize is the unit of segment sizes and of the capacity.
const PageSize = 4096

// DefaultSegmentSize is the growth unit when Config.SegmentSize is zero.
const DefaultSegmentSize = 64 << 20

// DiscardMin is the least run of whole free pages the arena gives back to
// the kernel at once (see "Returning memory" in the package doc).
const DiscardMin = 64 << 10

// maxRequest bounds a single request so that rounding never overflows.
const maxRequest = 1 << 62

// Owner names who holds a region: HostOwner, or a plugin generation
// (PluginOwner).
type Owner string

// HostOwner owns the host's own regions (model weights, journals, bound
// factors).
const HostOwner Owner = "host"

// PluginOwner names the leases of one plugin generation: "plugin:NAME#GEN".
func PluginOwner(name string, generation uint64) Owner {
	return Owner(fmt.Sprintf("plugin:%s#%d", name, generation))
}

// Region is a lease on bytes of one segment: what descriptors carry.
// Length is the length the caller asked for; the region occupies it rounded
// up to Alignment. Segment ids start at 1 and generations at 1, so the zero
// Region is never valid.
type Region struct {
	Segment    uint32
	Offset     uint64
	Length     uint64
	Generation uint64
}

func (r Region) String() string {
	return fmt.Sprintf("segment %d offset %d length %d generation %d", r.Segment, r.Offset, r.Length, r.Generation)
}

// LogValue logs the region's four fields.
func (r Region) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Uint64("segment", uint64(r.Segment)),
		slog.Uint64("offset", r.Offset),
		slog.Uint64("length", r.Length),
		slog.Uint64("generation", r.Generation),
	)
}

// Config configures an arena.
type Config struct {
	// Capacity limits the bytes the arena reserves from its backend
	// (rounded down to PageSize; at least one page). Required.
	Capacity uint64
	// SegmentSize is the growth unit (rounded up to PageSize, capped at
	// Capacity); DefaultSegmentSize when zero. The first segment is
	// created by New.
	SegmentSize uint64
	// RetainEmpty keeps empty segments until Close instead of returning
	// them to the backend (see the package doc).
	RetainEmpty bool
	// Logger receives segment and lease events; slog.Default() when nil.
	Logger *slog.Logger
}

// Arena sub-allocates a backend's segments. Create it with New.
type Arena struct {
	backend     Backend
	name        string
	capacity    uint64
	segSize     uint64
	retainEmpty bool
	mapped      bool // the backend's segments have host mappings (set by New)
	log         *slog.Logger

	mu        sync.Mutex
	closed    bool
	segments  map[uint32]*segment
	nextSeg   uint32 // last id handed out
	nextGen   uint64 // last generation handed out
	free      *treap[extent]
	owners    map[Owner]*ownerLeases
	reserved  uint64
	allocated uint64
	requested uint64
	peak      uint64
	regions   int
	discarded uint64
}

// segment is the arena's bookkeeping for one backend segment.
type segment struct {
	id          uint32
	size        uint64
	seg         Segment
	mem         []byte
	loc         Location
	freeByStart map[uint64]uint64 // free extent start → length
	freeByEnd   map[uint64]uint64 // free extent end → start
	allocs      *treap[*lease]    // live leases by offset
	used        uint64            // aligned bytes of live leases
	// discard gives free pages back to the kernel; nil when the segment
	// cannot (or refused once).
	discard Discarder
}

// extent is a free range, ordered by size for best fit.
type extent struct {
	size uint64
	seg  uint32
	off  uint64
}

func cmpExtent(a, b extent) int {
	if c := cmp.Compare(a.size, b.size); c != 0 {
		return c
	}
	if c := cmp.Compare(a.seg, b.seg); c != 0 {
		return c
	}
	return cmp.Compare(a.off, b.off)
}

// lease is one live allocation.
type lease struct {
	seg    uint32
	off    uint64
	size   uint64 // aligned
	length uint64 // as requested
	gen    uint64
	owner  Owner
	name   string
}

func cmpLeaseOffset(a, b *lease) int { return cmp.Compare(a.off, b.off) }

func (l *lease) region() Region {
	return Region{Segment: l.seg, Offset: l.off, Length: l.length, Generation: l.gen}
}

type ownerLeases struct {
	leases map[*lease]struct{}
	bytes  uint64
}

// New creates an arena on b and its first segment. The arena owns b from
// then on: Close closes it, and so does a failing New.
func New(ctx context.Context, b Backend, cfg Config) (*Arena, error) {
	if b == nil {
		return nil, fmt.Errorf("new arena: %w: nil backend", ErrInvalid)
	}
	capacity := cfg.Capacity / PageSize * PageSize
	if capacity == 0 {
		_ = b.Close()
		return nil, fmt.Errorf("new arena: config: capacity %d bytes: %w: must be at least one page (%d bytes)", cfg.Capacity, ErrInvalid, PageSize)
	}
	segSize := cfg.SegmentSize
	if segSize == 0 {
		segSize = DefaultSegmentSize
	}
	segSize = min(alignUp(min(segSize, maxRequest), PageSize), capacity)
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	a := &Arena{
		backend:     b,
		name:        b.Name(),
		capacity:    capacity,
		segSize:     segSize,
		retainEmpty: cfg.RetainEmpty,
		log:         log.With(slog.String("arena", b.Name())),
		segments:    make(map[uint32]*segment),
		free:        newTreap(cmpExtent),
		owners:      make(map[Owner]*ownerLeases),
	}
	if _, err := a.grow(segSize); err != nil {
		_ = b.Close()
		return nil, fmt.Errorf("new arena: %w", err)
	}
	a.log.LogAttrs(ctx, slog.LevelInfo, "arena ready",
		slog.Any("capacity", ByteSize(capacity)), slog.Any("segment_size", ByteSize(segSize)))
	return a, nil
}

func alignUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// grow adds a segment of size bytes (a multiple of PageSize). Callers hold mu
// (or own a not yet shared arena) and have checked the capacity.
func (a *Arena) grow(size uint64) (*segment, error) {
	a.nextSeg++
	id := a.nextSeg
	bs, err := a.backend.Create(id, size)
	if err != nil {
		return nil, fmt.Errorf("create segment %d of %s on %s: %w", id, ByteSize(size), a.name, err)
	}
	loc := bs.Location()
	mem := bs.Bytes()
	if loc.SegmentID != id || loc.Size != size || (mem != nil && uint64(len(mem)) != size) {
		_ = bs.Close()
		return nil, fmt.Errorf("create segment %d of %s on %s: backend returned segment %d of %d bytes with a %d-byte mapping",
			id, ByteSize(size), a.name, loc.SegmentID, loc.Size, len(mem))
	}
	s := &segment{
		id: id, size: size, seg: bs, mem: mem, loc: loc,
		freeByStart: make(map[uint64]uint64),
		freeByEnd:   make(map[uint64]uint64),
		allocs:      newTreap(cmpLeaseOffset),
	}
	s.discard, _ = bs.(Discarder)
	if id == 1 {
		a.mapped = mem != nil
	}
	a.segments[id] = s
	a.reserved += size
	a.addFree(s, 0, size)
	a.log.Info("segment created", slog.Uint64("segment", uint64(id)), slog.Any("size", ByteSize(size)),
		slog.String("path", loc.Path), slog.Any("reserved", ByteSize(a.reserved)))
	return s, nil
}

func (a *Arena) addFree(s *segment, off, size uint64) {
	s.freeByStart[off] = size
	s.freeByEnd[off+size] = off
	a.free.Insert(extent{size: size, seg: s.id, off: off})
}

func (a *Arena) removeFree(s *segment, off, size uint64) {
	delete(s.freeByStart, off)
	delete(s.freeByEnd, off+size)
	a.free.Delete(extent{size: size, seg: s.id, off: off})
}

func checkOwner(owner Owner) error {
	if owner == "" || strings.TrimSpace(string(owner)) != string(owner) {
		return fmt.Errorf("%w: owner %q must be non-empty without surrounding space", ErrInvalid, owner)
	}
	return nil
}

// Alloc leases n bytes to owner. name says what the region is for (logs,
// errors). The region is Alignment-aligned and zero the first time its bytes
// are used; reused bytes are not cleared (whole pages the arena gave back
// to the kernel read as zero again, but callers must not count on it). When nothing fits, the arena
// grows up to its capacity; past it, the error is a *CapacityError.
func (a *Arena) Alloc(owner Owner, name string, n uint64) (Region, error) {
	if err := checkOwner(owner); err != nil {
		return Region{}, fmt.Errorf("alloc %q: %w", name, err)
	}
	if n == 0 {
		return Region{}, fmt.Errorf("alloc %q for %s: %w: zero length", name, owner, ErrInvalid)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return Region{}, fmt.Errorf("alloc %q for %s: %w", name, owner, ErrClosed)
	}
	if n > maxRequest {
		return Region{}, a.capacityError(owner, name, n, n)
	}
	size := alignUp(n, Alignment)
	ext, ok := a.free.Ceil(extent{size: size})
	if !ok {
		need := alignUp(size, PageSize)
		headroom := a.capacity - a.reserved // a multiple of PageSize
		if need > headroom && need <= headroom+a.reclaimable() {
			// Spare empty segments stand in the way of a larger one.
			a.releaseEmpty()
			headroom = a.capacity - a.reserved
		}
		// A standard segment, a larger one for a large request, or what
		// is left when the request itself still fits.
		segSize := min(max(a.segSize, need), headroom)
		if segSize < need {
			err := a.capacityError(owner, name, n, size)
			a.log.Warn("alloc refused", slog.Any("error", err))
			return Region{}, err
		}
		s, err := a.grow(segSize)
		if err != nil {
			return Region{}, fmt.Errorf("alloc %q for %s: %w", name, owner, err)
		}
		ext = extent{size: s.size, seg: s.id, off: 0}
	}
	s := a.segments[ext.seg]
	a.removeFree(s, ext.off, ext.size)
	if ext.size > size {
		a.addFree(s, ext.off+size, ext.size-size)
	}
	a.nextGen++
	l := &lease{seg: s.id, off: ext.off, size: size, length: n, gen: a.nextGen, owner: owner, name: name}
	s.allocs.Insert(l)
	s.used += size
	a.addLease(l)
	a.allocated += size
	a.requested += n
	a.regions++
	a.peak = max(a.peak, a.allocated)
	r := l.region()
	if a.log.Enabled(context.Background(), slog.LevelDebug) {
		a.log.Debug("alloc", slog.String("owner", string(owner)), slog.String("name", name), slog.Any("region", r))
	}
	return r, nil
}

func (a *Arena) addLease(l *lease) {
	o := a.owners[l.owner]
	if o == nil {
		o = &ownerLeases{leases: make(map[*lease]struct{})}
		a.owners[l.owner] = o
	}
	o.leases[l] = struct{}{}
	o.bytes += l.size
}

func (a *Arena) dropLease(l *lease) {
	o := a.owners[l.owner]
	delete(o.leases, l)
	o.bytes -= l.size
	if len(o.leases) == 0 {
		delete(a.owners, l.owner)
	}
}

// capacityError builds the error for a request of n bytes (size aligned).
// Callers hold mu.
func (a *Arena) capacityError(owner Owner, name string, n, size uint64) error {
	largest := uint64(0)
	if e, ok := a.free.Max(); ok {
		largest = e.size
	}
	headroom := a.capacity - a.reserved
	return &CapacityError{
		Owner: owner, Name: name,
		Requested:   ByteSize(n),
		Aligned:     ByteSize(size),
		Capacity:    ByteSize(a.capacity),
		Allocated:   ByteSize(a.allocated),
		Free:        ByteSize(a.reserved - a.allocated),
		LargestFree: ByteSize(largest),
		Headroom:    ByteSize(headroom),
		MaxAlloc:    ByteSize(max(largest, headroom+a.reclaimable())),
	}
}

// lookup finds the live lease containing r. With exact set, r must be the
// whole region as Alloc or Transfer returned it. Callers hold mu.
func (a *Arena) lookup(r Region, exact bool) (*segment, *lease, error) {
	if a.closed {
		return nil, nil, ErrClosed
	}
	if r.Segment == 0 || r.Segment > a.nextSeg {
		return nil, nil, fmt.Errorf("%w: no segment %d (segments 1..%d exist or existed)", ErrInvalid, r.Segment, a.nextSeg)
	}
	if r.Length == 0 {
		return nil, nil, fmt.Errorf("%w: zero length", ErrInvalid)
	}
	s := a.segments[r.Segment]
	if s == nil {
		return nil, nil, fmt.Errorf("%w: segment %d was released", ErrStale, r.Segment)
	}
	l, ok := s.allocs.Floor(&lease{off: r.Offset})
	if !ok || (exact && l.off != r.Offset) || r.Offset >= l.off+l.length {
		return nil, nil, fmt.Errorf("%w: no live region at segment %d offset %d", ErrStale, r.Segment, r.Offset)
	}
	if l.gen != r.Generation {
		return nil, nil, fmt.Errorf("%w: generation %d, but the live region at segment %d offset %d has generation %d (freed or reused)",
			ErrStale, r.Generation, l.seg, l.off, l.gen)
	}
	if exact && r.Length != l.length {
		return nil, nil, fmt.Errorf("%w: length %d, but the live region has length %d", ErrInvalid, r.Length, l.length)
	}
	if r.Length > l.off+l.length-r.Offset {
		return nil, nil, fmt.Errorf("%w: range [%d, %d) runs past the live region [%d, %d)",
			ErrInvalid, r.Offset, r.Offset+r.Length, l.off, l.off+l.length)
	}
	return s, l, nil
}

// Check validates a descriptor: r must be a live region with its current
// generation, or a range inside one with that region's generation (a
// tensor inside a larger region).
func (a *Arena) Check(r Region) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, _, err := a.lookup(r, false); err != nil {
		return fmt.Errorf("check region %v: %w", r, err)
	}
	return nil
}

// Free ends the lease on r, which must be exactly a region Alloc or
// Transfer returned. A second Free, or a Free after the region was
// reclaimed or transferred, returns ErrStale and changes nothing.
func (a *Arena) Free(r Region) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, l, err := a.lookup(r, true)
	if err != nil {
		return fmt.Errorf("free region %v: %w", r, err)
	}
	a.release(s, l)
	if a.log.Enabled(context.Background(), slog.LevelDebug) {
		a.log.Debug("free", slog.String("owner", string(l.owner)), slog.String("name", l.name), slog.Any("region", r))
	}
	return nil
}

// FreeOwned is Free for a caller that may only free its own regions (a
// plugin generation asking the host to free what it allocated): it fails
// with ErrNotOwner, changing nothing, when r is live but leased to another
// owner.
func (a *Arena) FreeOwned(owner Owner, r Region) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, l, err := a.lookup(r, true)
	if err != nil {
		return fmt.Errorf("free region %v for %s: %w", r, owner, err)
	}
	if l.owner != owner {
		return fmt.Errorf("free region %v for %s: %w: leased to %s", r, owner, ErrNotOwner, l.owner)
	}
	a.release(s, l)
	return nil
}

// Lease describes one live region: who holds it and what it is for.
type Lease struct {
	Region Region
	Owner  Owner
	Name   string
	Size   ByteSize // the aligned bytes it occupies
}

// Lease returns the lease of r (a whole region or a range inside one).
func (a *Arena) Lease(r Region) (Lease, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, l, err := a.lookup(r, false)
	if err != nil {
		return Lease{}, fmt.Errorf("lease of region %v: %w", r, err)
	}
	return l.info(), nil
}

// Leases returns every live lease, ordered by segment and offset (for the
// console and for debugging leaks).
func (a *Arena) Leases() []Lease {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Lease, 0, a.regions)
	for _, s := range a.segments {
		s.allocs.Ascend(func(l *lease) bool {
			out = append(out, l.info())
			return true
		})
	}
	slices.SortFunc(out, func(x, y Lease) int {
		if c := cmp.Compare(x.Region.Segment, y.Region.Segment); c != 0 {
			return c
		}
		return cmp.Compare(x.Region.Offset, y.Region.Offset)
	})
	return out
}

func (l *lease) info() Lease {
	return Lease{Region: l.region(), Owner: l.owner, Name: l.name, Size: ByteSize(l.size)}
}

// release ends lease l in s, coalesces its extent with free neighbours and
// returns an emptied segment to the backend when the policy says so.
// Callers hold mu.
func (a *Arena) release(s *segment, l *lease) {
	s.allocs.Delete(l)
	s.used -= l.size
	a.dropLease(l)
	a.allocated -= l.size
	a.requested -= l.length
	a.regions--

	off, end := l.off, l.off+l.size
	if start, ok := s.freeByEnd[off]; ok {
		a.removeFree(s, start, off-start)
		off = start
	}
	if n, ok := s.freeByStart[end]; ok {
		a.removeFree(s, end, n)
		end += n
	}
	a.addFree(s, off, end-off)
	if s.used == 0 && a.shouldRelease(s) {
		a.dropSegment(s)
		return
	}
	a.discardFreed(s, off, end, l.off, l.off+l.size)
}

// discardFreed gives the kernel the whole pages of the free extent
// [off, end) that the release of [loff, lend) made free, keeping the
// invariant that every free extent with at least DiscardMin bytes of whole
// pages holds no memory there. A merged neighbour that was that large
// already is skipped; a smaller one may hold pages and is discarded with
// the rest. Callers hold mu.
func (a *Arena) discardFreed(s *segment, off, end, loff, lend uint64) {
	if s.discard == nil {
		return
	}
	lo, hi := alignUp(off, PageSize), alignDown(end, PageSize)
	if hi <= lo || hi-lo < DiscardMin {
		return // too small to keep discarded: no claim, no system call
	}
	if l, h := alignUp(off, PageSize), alignDown(loff, PageSize); h > l && h-l >= DiscardMin {
		lo = h // the left neighbour was discarded when it became free
	}
	if l, h := alignUp(lend, PageSize), alignDown(end, PageSize); h > l && h-l >= DiscardMin {
		hi = l // so was the right one
	}
	if hi <= lo {
		return
	}
	if err := s.discard.Discard(lo, hi-lo); err != nil {
		// The pages stay committed until the segment goes; later frees in
		// this segment do not try again.
		s.discard = nil
		level := slog.LevelWarn
		if errors.Is(err, errors.ErrUnsupported) {
			level = slog.LevelInfo
		}
		a.log.Log(context.Background(), level, "segment keeps freed pages",
			slog.Uint64("segment", uint64(s.id)), slog.Any("error", err))
		return
	}
	a.discarded += hi - lo
}

func alignDown(n, to uint64) uint64 { return n / to * to }

// reclaimable returns the bytes of empty segments the policy lets the arena
// give back to make room for a larger segment. Callers hold mu.
func (a *Arena) reclaimable() uint64 {
	if a.retainEmpty {
		return 0
	}
	var n uint64
	for _, s := range a.segments {
		if s.used == 0 {
			n += s.size
		}
	}
	return n
}

// releaseEmpty gives every empty segment back to the backend. Callers hold
// mu and have checked the policy.
func (a *Arena) releaseEmpty() {
	for _, s := range a.segments {
		if s.used == 0 {
			a.dropSegment(s)
		}
	}
}

// dropSegment returns the empty segment s to the backend. Callers hold mu.
func (a *Arena) dropSegment(s *segment) {
	a.removeFree(s, 0, s.size)
	delete(a.segments, s.id)
	a.reserved -= s.size
	err := s.seg.Close()
	a.log.Info("segment released", slog.Uint64("segment", uint64(s.id)), slog.Any("size", ByteSize(s.size)),
		slog.Any("reserved", ByteSize(a.reserved)), slog.Any("error", err))
}

// shouldRelease applies the empty-segment policy to the now empty s.
func (a *Arena) shouldRelease(s *segment) bool {
	if a.retainEmpty {
		return false
	}
	if s.size != a.segSize {
		return true
	}
	for _, o := range a.segments {
		if o != s && o.used == 0 && o.size == a.segSize {
			return true // another standard spare exists
		}
	}
	return false
}

// Bytes returns the host's view of r (a whole region or a range inside
// one), with its capacity limited to r. It fails with ErrNoHostView on a
// backend without host mappings (device memory): Read, Write and Copy work
// on every backend.
func (a *Arena) Bytes(r Region) ([]byte, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, _, err := a.lookup(r, false)
	if err != nil {
		return nil, fmt.Errorf("bytes of region %v: %w", r, err)
	}
	if s.mem == nil {
		return nil, fmt.Errorf("bytes of region %v: %w (%s backend): use Read, Write or Copy", r, ErrNoHostView, a.name)
	}
	return s.mem[r.Offset : r.Offset+r.Length : r.Offset+r.Length], nil
}

// Location returns where r's segment lives, for a descriptor; r.Offset is
// the region's offset within it.
func (a *Arena) Location(r Region) (Location, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, _, err := a.lookup(r, false)
	if err != nil {
		return Location{}, fmt.Errorf("location of region %v: %w", r, err)
	}
	loc := s.loc
	loc.IPCHandle = bytes.Clone(s.loc.IPCHandle)
	return loc, nil
}

// Transfer hands the region r to another owner, for example factors a
// plugin allocated that the host then binds, so they survive the plugin's
// restart. The region keeps its bytes and place but takes a new
// generation: r itself becomes stale, and the returned region is the
// descriptor from then on.
func (a *Arena) Transfer(r Region, to Owner) (Region, error) {
	if err := checkOwner(to); err != nil {
		return Region{}, fmt.Errorf("transfer region %v: %w", r, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	_, l, err := a.lookup(r, true)
	if err != nil {
		return Region{}, fmt.Errorf("transfer region %v to %s: %w", r, to, err)
	}
	from := l.owner
	a.dropLease(l)
	l.owner = to
	a.nextGen++
	l.gen = a.nextGen
	a.addLease(l)
	nr := l.region()
	if a.log.Enabled(context.Background(), slog.LevelDebug) {
		a.log.Debug("transfer", slog.String("from", string(from)), slog.String("to", string(to)),
			slog.String("name", l.name), slog.Any("region", nr))
	}
	return nr, nil
}

// ReleaseOwner reclaims every region owner holds, for example when a plugin
// generation dies, and returns how many regions and aligned bytes it
// reclaimed. Their descriptors become stale.
func (a *Arena) ReleaseOwner(owner Owner) (regions int, freed ByteSize) {
	a.mu.Lock()
	defer a.mu.Unlock()
	o := a.owners[owner]
	if o == nil || a.closed {
		return 0, 0
	}
	regions, freed = len(o.leases), ByteSize(o.bytes)
	for l := range o.leases {
		a.release(a.segments[l.seg], l)
	}
	a.log.Info("owner released", slog.String("owner", string(owner)), slog.Int("regions", regions), slog.Any("bytes", freed))
	return regions, freed
}

// Owned returns the aligned bytes owner holds.
func (a *Arena) Owned(owner Owner) ByteSize {
	a.mu.Lock()
	defer a.mu.Unlock()
	if o := a.owners[owner]; o != nil {
		return ByteSize(o.bytes)
	}
	return 0
}

// Stats returns a snapshot of the arena's figures (see Stats for the
// definitions).
func (a *Arena) Stats() Stats {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := Stats{
		Backend:   a.name,
		Capacity:  ByteSize(a.capacity),
		Reserved:  ByteSize(a.reserved),
		Allocated: ByteSize(a.allocated),
		Requested: ByteSize(a.requested),
		Peak:      ByteSize(a.peak),
		Free:      ByteSize(a.reserved - a.allocated),
		Headroom:  ByteSize(a.capacity - a.reserved),
		Segments:  len(a.segments),
		Regions:   a.regions,
		Owners:    len(a.owners),
		Discarded: ByteSize(a.discarded),
	}
	if e, ok := a.free.Max(); ok {
		st.LargestFree = ByteSize(e.size)
	}
	if st.Free > 0 {
		st.Fragmentation = 1 - float64(st.LargestFree)/float64(st.Free)
	}
	return st
}

// Close releases every segment and then the backend. Live regions are
// dropped (and logged); their descriptors become invalid. Later calls
// return ErrClosed; a second Close returns nil.
func (a *Arena) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	if a.regions > 0 {
		a.log.Info("closing with live regions", slog.Int("regions", a.regions), slog.Int("owners", len(a.owners)),
			slog.Any("allocated", ByteSize(a.allocated)))
	}
	var errs []error
	for id, s := range a.segments {
		if err := s.seg.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close segment %d: %w", id, err))
		}
	}
	if err := a.backend.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close backend %s: %w", a.name, err))
	}
	a.segments = map[uint32]*segment{}
	a.owners = map[Owner]*ownerLeases{}
	a.free = newTreap(cmpExtent)
	a.reserved, a.allocated, a.requested, a.regions = 0, 0, 0, 0
	a.log.Info("arena closed")
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close arena: %w", err)
	}
	return nil
}
