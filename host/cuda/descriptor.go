package cuda

import (
	"fmt"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// SlabProto is the protocol form of a device segment's location: what a
// descriptor's Region carries so a plugin can open the slab once
// (cuIpcOpenMemHandle) and address base + offset.
func SlabProto(loc arena.Location) (*pluginv1.CUDASlab, error) {
	if err := checkLocation(loc); err != nil {
		return nil, err
	}
	return &pluginv1.CUDASlab{
		Id: loc.SegmentID, IpcHandle: append([]byte(nil), loc.IPCHandle...), Size: loc.Size,
		Device: int32(loc.Device), HostPid: int32(loc.HostPID),
	}, nil
}

// LocationFromSlab checks a received CUDASlab and returns its location.
func LocationFromSlab(s *pluginv1.CUDASlab) (arena.Location, error) {
	if s == nil {
		return arena.Location{}, fmt.Errorf("cuda slab: missing")
	}
	loc := arena.Location{
		Kind: arena.KindCUDA, SegmentID: s.GetId(), Size: s.GetSize(), HostPID: int(s.GetHostPid()),
		IPCHandle: append([]byte(nil), s.GetIpcHandle()...), Device: int(s.GetDevice()),
	}
	if err := checkLocation(loc); err != nil {
		return arena.Location{}, err
	}
	return loc, nil
}

// RegionAddr checks that a region lies inside its slab and returns the
// byte offset of its first element: the address a reader uses is the
// opened slab's base plus this offset.
func RegionAddr(r *pluginv1.Region) (arena.Location, uint64, error) {
	c, ok := r.GetSegment().(*pluginv1.Region_Cuda)
	if !ok {
		return arena.Location{}, 0, fmt.Errorf("region at offset %d: not a cuda slab", r.GetOffset())
	}
	loc, err := LocationFromSlab(c.Cuda)
	if err != nil {
		return arena.Location{}, 0, err
	}
	end := r.GetOffset() + r.GetLength()
	if end < r.GetOffset() || end > loc.Size {
		return arena.Location{}, 0, fmt.Errorf("cuda slab %d: region offset %d length %d past the slab's %d bytes",
			loc.SegmentID, r.GetOffset(), r.GetLength(), loc.Size)
	}
	return loc, r.GetOffset(), nil
}

func checkLocation(loc arena.Location) error {
	switch {
	case loc.Kind != arena.KindCUDA:
		return fmt.Errorf("cuda slab %d: location kind %q, want %q", loc.SegmentID, loc.Kind, arena.KindCUDA)
	case loc.SegmentID == 0:
		return fmt.Errorf("cuda slab: id 0 (segment ids start at 1)")
	case len(loc.IPCHandle) != HandleSize:
		return fmt.Errorf("cuda slab %d: ipc_handle has %d bytes, want %d", loc.SegmentID, len(loc.IPCHandle), HandleSize)
	case loc.Size == 0:
		return fmt.Errorf("cuda slab %d: size 0", loc.SegmentID)
	case loc.Device < 0:
		return fmt.Errorf("cuda slab %d: device %d", loc.SegmentID, loc.Device)
	case loc.HostPID <= 0:
		return fmt.Errorf("cuda slab %d: host_pid %d", loc.SegmentID, loc.HostPID)
	}
	return nil
}
