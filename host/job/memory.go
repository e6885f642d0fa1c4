package job

import (
	"fmt"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Memory is what jobs need from the arena: the host's view of a tensor a
// plugin published, and host-owned regions to copy latents into.
type Memory interface {
	// View returns the bytes of a live region (checked against its
	// generation), valid until the region is freed.
	View(r *pluginv1.Region) ([]byte, error)
	// Alloc leases n bytes to the host and returns the region, as a
	// descriptor carries it, with the host's view of it.
	Alloc(name string, n uint64) (*pluginv1.Region, []byte, error)
	// Free ends the lease on a region Alloc returned.
	Free(r *pluginv1.Region) error
}

// ArenaMemory adapts *arena.Arena to Memory; the regions it allocates
// belong to arena.HostOwner.
func ArenaMemory(a *arena.Arena) Memory { return arenaMemory{a} }

type arenaMemory struct{ a *arena.Arena }

func fromProto(r *pluginv1.Region) (arena.Region, error) {
	var seg uint32
	switch s := r.GetSegment().(type) {
	case *pluginv1.Region_Cpu:
		seg = s.Cpu.GetId()
	case *pluginv1.Region_Cuda:
		return arena.Region{}, fmt.Errorf("region on CUDA slab %d: previews need a CPU segment", s.Cuda.GetId())
	default:
		return arena.Region{}, fmt.Errorf("region without a segment")
	}
	return arena.Region{Segment: seg, Offset: r.GetOffset(), Length: r.GetLength(), Generation: r.GetGeneration()}, nil
}

func (m arenaMemory) View(r *pluginv1.Region) ([]byte, error) {
	ar, err := fromProto(r)
	if err != nil {
		return nil, err
	}
	return m.a.Bytes(ar)
}

func (m arenaMemory) Alloc(name string, n uint64) (*pluginv1.Region, []byte, error) {
	r, err := m.a.Alloc(arena.HostOwner, name, n)
	if err != nil {
		return nil, nil, err
	}
	loc, err := m.a.Location(r)
	if err == nil && loc.Kind != arena.KindCPU {
		err = fmt.Errorf("segment %d is %s, previews need a CPU segment", loc.SegmentID, loc.Kind)
	}
	var b []byte
	if err == nil {
		b, err = m.a.Bytes(r)
	}
	if err != nil {
		_ = m.a.Free(r)
		return nil, nil, fmt.Errorf("alloc %s: %w", name, err)
	}
	return &pluginv1.Region{
		Segment: &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{Id: loc.SegmentID, Path: loc.Path, Size: loc.Size, HostPid: int32(loc.HostPID)}},
		Offset:  r.Offset, Length: r.Length, Generation: r.Generation,
	}, b, nil
}

func (m arenaMemory) Free(r *pluginv1.Region) error {
	ar, err := fromProto(r)
	if err != nil {
		return err
	}
	return m.a.FreeOwned(arena.HostOwner, ar)
}
