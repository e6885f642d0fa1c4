package cuda

import (
	"fmt"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// SlabProto is the protocol form of a device segment's location: what a
// descriptor's Region carries so a plugin can open the slab once
// (cuIpcOpenMemHandle) and address base + offset.
func SlabProto(loc arena.Location) (*pluginv1.CUDASlab, error) {
	if loc.Kind != arena.KindCUDA {
		return nil, fmt.Errorf("cuda slab %d: location kind %q, want %q", loc.SegmentID, loc.Kind, arena.KindCUDA)
	}
	if len(loc.IPCHandle) != gpu.HandleSize {
		return nil, fmt.Errorf("cuda slab %d: ipc_handle has %d bytes, want %d", loc.SegmentID, len(loc.IPCHandle), gpu.HandleSize)
	}
	s := gpu.SlabLocation{ID: loc.SegmentID, Size: loc.Size, Device: loc.Device, HostPID: loc.HostPID}
	copy(s.Handle[:], loc.IPCHandle)
	return s.Proto()
}

// LocationFromSlab checks a received CUDASlab and returns its arena location.
func LocationFromSlab(s *pluginv1.CUDASlab) (arena.Location, error) {
	l, err := gpu.SlabFromProto(s)
	if err != nil {
		return arena.Location{}, err
	}
	return arena.Location{Kind: arena.KindCUDA, SegmentID: l.ID, Size: l.Size, HostPID: l.HostPID,
		IPCHandle: append([]byte(nil), l.Handle[:]...), Device: l.Device}, nil
}
