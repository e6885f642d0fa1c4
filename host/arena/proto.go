package arena

import (
	"fmt"

	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// RegionProto is the protocol form of region r, whose segment is at loc: the
// one place where arena regions become pluginv1 Regions (CPUSegment or
// CUDASlab plus offset, length and generation).
func RegionProto(r Region, loc Location) *pluginv1.Region {
	pr := &pluginv1.Region{Offset: r.Offset, Length: r.Length, Generation: r.Generation}
	switch loc.Kind {
	case KindCUDA:
		pr.Segment = &pluginv1.Region_Cuda{Cuda: &pluginv1.CUDASlab{
			Id: loc.SegmentID, IpcHandle: loc.IPCHandle, Size: loc.Size, Device: int32(loc.Device), HostPid: int32(loc.HostPID),
		}}
	default:
		pr.Segment = &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{
			Id: loc.SegmentID, Path: loc.Path, Size: loc.Size, HostPid: int32(loc.HostPID),
		}}
	}
	return pr
}

// RegionFromProto recovers the arena region a protocol Region names. The
// arena still checks it (generation, bounds) when it is used.
func RegionFromProto(r *pluginv1.Region) (Region, error) {
	var seg uint32
	switch s := r.GetSegment().(type) {
	case *pluginv1.Region_Cpu:
		seg = s.Cpu.GetId()
	case *pluginv1.Region_Cuda:
		seg = s.Cuda.GetId()
	default:
		return Region{}, fmt.Errorf("region at offset %d: no segment: %w", r.GetOffset(), ErrInvalid)
	}
	return Region{Segment: seg, Offset: r.GetOffset(), Length: r.GetLength(), Generation: r.GetGeneration()}, nil
}
