package plugin

import (
	"errors"
	"fmt"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// ArenaOf adapts the host's arena to the Arena the manager consumes:
// regions become protocol Regions carrying their segment's location, and
// owners are the arena's plugin owners ("plugin:NAME#GEN").
func ArenaOf(a *arena.Arena) Arena { return arenaAdapter{a} }

type arenaAdapter struct{ a *arena.Arena }

func (x arenaAdapter) Alloc(owner, name string, n uint64) (*pluginv1.Region, error) {
	r, err := x.a.Alloc(arena.Owner(owner), name, n)
	if err != nil {
		return nil, err
	}
	loc, err := x.a.Location(r)
	if err != nil {
		return nil, errors.Join(err, x.a.Free(r))
	}
	return RegionProto(r, loc), nil
}

func (x arenaAdapter) Free(owner string, r *pluginv1.Region) error {
	ar, err := arenaRegion(r)
	if err != nil {
		return err
	}
	return x.a.FreeOwned(arena.Owner(owner), ar)
}

func (x arenaAdapter) ReleaseOwner(owner string) error {
	x.a.ReleaseOwner(arena.Owner(owner))
	return nil
}

// RegionProto is the protocol form of an arena region at loc.
func RegionProto(r arena.Region, loc arena.Location) *pluginv1.Region {
	pr := &pluginv1.Region{Offset: r.Offset, Length: r.Length, Generation: r.Generation}
	switch loc.Kind {
	case arena.KindCUDA:
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

func arenaRegion(r *pluginv1.Region) (arena.Region, error) {
	var seg uint32
	switch s := r.GetSegment().(type) {
	case *pluginv1.Region_Cpu:
		seg = s.Cpu.GetId()
	case *pluginv1.Region_Cuda:
		seg = s.Cuda.GetId()
	default:
		return arena.Region{}, fmt.Errorf("region at offset %d: no segment", r.GetOffset())
	}
	return arena.Region{Segment: seg, Offset: r.GetOffset(), Length: r.GetLength(), Generation: r.GetGeneration()}, nil
}
