package arena

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
)

// ByteSize is a count of bytes. It prints and logs itself in binary units
// ("64.0 MiB"); figures under 1 KiB print exactly ("255 B").
type ByteSize uint64

// String formats b with binary units and one decimal.
func (b ByteSize) String() string {
	const unit = 1024
	if b < unit {
		return strconv.FormatUint(uint64(b), 10) + " B"
	}
	div, exp := uint64(unit), 0
	for n := uint64(b) / unit; n >= unit && exp < 5; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(b)/float64(div), "KMGTPE"[exp])
}

// LogValue logs b as its String.
func (b ByteSize) LogValue() slog.Value { return slog.StringValue(b.String()) }

// Stats is a snapshot of the arena's figures.
//
// Definitions. Reserved is what the arena holds from its backend (the sum
// of its segments' sizes). Allocated is what live regions occupy, each
// rounded up to Alignment; Requested is the sum of the lengths callers
// asked for (Allocated − Requested is alignment overhead). Free is
// Reserved − Allocated: the bytes inside existing segments that no region
// occupies. It does not include Headroom (Capacity − Reserved), which the
// arena could still obtain by growing. LargestFree is the largest
// contiguous free extent inside one segment, and Fragmentation is
// 1 − LargestFree/Free (0 when Free is 0): 0 means all free bytes form one
// extent, values near 1 mean the free bytes are scattered in small pieces.
type Stats struct {
	Backend       string
	Capacity      ByteSize // the configured limit on Reserved
	Reserved      ByteSize // bytes in segments obtained from the backend
	Allocated     ByteSize // bytes occupied by live regions (aligned sizes)
	Requested     ByteSize // bytes asked for by live regions (exact lengths)
	Peak          ByteSize // the highest Allocated seen
	Free          ByteSize // Reserved − Allocated
	LargestFree   ByteSize // the largest free extent within one segment
	Headroom      ByteSize // Capacity − Reserved: still obtainable by growth
	Fragmentation float64  // 1 − LargestFree/Free; 0 when Free is 0
	Segments      int      // live segments
	Regions       int      // live regions
	Owners        int      // owners holding at least one region
	// Discarded counts the bytes of freed ranges given back to the kernel
	// since the arena was made (see "Returning memory" in the package
	// doc); it only grows, and stays 0 on backends that cannot discard.
	Discarded ByteSize
}

// LogValue groups the figures under their names.
func (s Stats) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("backend", s.Backend),
		slog.Any("capacity", s.Capacity),
		slog.Any("reserved", s.Reserved),
		slog.Any("allocated", s.Allocated),
		slog.Any("requested", s.Requested),
		slog.Any("peak", s.Peak),
		slog.Any("free", s.Free),
		slog.Any("largest_free", s.LargestFree),
		slog.Any("headroom", s.Headroom),
		slog.String("fragmentation", strconv.FormatFloat(s.Fragmentation, 'f', 3, 64)),
		slog.Int("segments", s.Segments),
		slog.Int("regions", s.Regions),
		slog.Int("owners", s.Owners),
		slog.Any("discarded", s.Discarded),
	)
}

// Errors the arena returns, wrapped with the operation and the region.
var (
	// ErrCapacity: the request does not fit the configured capacity. The
	// error is a *CapacityError with the figures.
	ErrCapacity = errors.New("arena capacity exceeded")
	// ErrStale: the region was freed, reclaimed or reused (its generation
	// is not the live one).
	ErrStale = errors.New("stale region")
	// ErrInvalid: the request or descriptor is malformed (zero length,
	// unknown segment, range outside the region, empty owner).
	ErrInvalid = errors.New("invalid region request")
	// ErrNoHostView: the backend's memory is not addressable by the host
	// (device memory): Bytes fails with it; move bytes with Read, Write
	// and Copy, and give other processes the region's Location.
	ErrNoHostView = errors.New("no host view of device memory")
	// ErrNotOwner: FreeOwned of a region another owner holds.
	ErrNotOwner = errors.New("region leased to another owner")
	// ErrClosed: the arena was closed.
	ErrClosed = errors.New("arena closed")
)

// CapacityError reports an allocation that does not fit. It matches
// ErrCapacity with errors.Is.
type CapacityError struct {
	Owner       Owner
	Name        string
	Requested   ByteSize // what the caller asked for
	Aligned     ByteSize // Requested rounded up to Alignment
	Capacity    ByteSize
	Allocated   ByteSize
	Free        ByteSize // free bytes inside existing segments
	LargestFree ByteSize // the largest free extent inside one segment
	Headroom    ByteSize // bytes the arena could still reserve by growing
	// MaxAlloc is the largest request that would have succeeded: the
	// larger of LargestFree and Headroom (rounded down to PageSize).
	MaxAlloc ByteSize
}

func (e *CapacityError) Error() string {
	return fmt.Sprintf("alloc %q for %s: %d bytes (%s) requested: %v: capacity %s, allocated %s, free %s (largest free extent %s), %s not yet reserved; largest possible allocation %s",
		e.Name, e.Owner, uint64(e.Requested), e.Requested, ErrCapacity, e.Capacity, e.Allocated, e.Free, e.LargestFree, e.Headroom, e.MaxAlloc)
}

// Is makes errors.Is(err, ErrCapacity) true.
func (e *CapacityError) Is(target error) bool { return target == ErrCapacity }
