package job

import (
	"fmt"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// Memory is what jobs need from the arena: the bytes of a tensor a plugin
// published, and host-owned shared-memory regions to copy latents into
// (the preview plugin maps those).
type Memory interface {
	// Read copies the first len(dst) bytes of a live region (checked
	// against its generation) into dst, downloading them when the region
	// is device memory.
	Read(r *pluginv1.Region, dst []byte) error
	// Alloc leases n bytes of shared memory to the host and returns the
	// region, as a descriptor carries it, with the host's view of it.
	Alloc(name string, n uint64) (*pluginv1.Region, []byte, error)
	// Free ends the lease on a region Alloc returned.
	Free(r *pluginv1.Region) error
}

// ArenaMemory adapts *arena.Arena to Memory; the regions it allocates
// belong to arena.HostOwner.
func ArenaMemory(a *arena.Arena) Memory { return arenaMemory{src: a, host: a} }

// SplitMemory is the Memory of a host whose arena is on the device: the
// tensors plugins publish are read (downloaded) from src, and the latent
// copies the preview plugin renders live in host, a shared-memory arena.
func SplitMemory(src, host *arena.Arena) Memory { return arenaMemory{src: src, host: host} }

type arenaMemory struct{ src, host *arena.Arena }

// Read checks that the region's kind is the source arena's (a CPU region
// named on a device arena would alias another segment id) and reads it.
func (m arenaMemory) Read(r *pluginv1.Region, dst []byte) error {
	ar, err := arena.RegionFromProto(r)
	if err != nil {
		return err
	}
	if uint64(len(dst)) > ar.Length {
		return fmt.Errorf("region of %d bytes: %d wanted", ar.Length, len(dst))
	}
	loc, err := m.src.Location(ar)
	if err != nil {
		return err
	}
	if _, cuda := r.GetSegment().(*pluginv1.Region_Cuda); cuda != (loc.Kind == arena.KindCUDA) {
		return fmt.Errorf("region on segment %d: descriptor and arena disagree on its kind (arena: %s)", ar.Segment, loc.Kind)
	}
	return m.src.Read(ar, 0, dst)
}

func (m arenaMemory) Alloc(name string, n uint64) (*pluginv1.Region, []byte, error) {
	r, err := m.host.Alloc(arena.HostOwner, name, n)
	if err != nil {
		return nil, nil, err
	}
	loc, err := m.host.Location(r)
	if err == nil && loc.Kind != arena.KindCPU {
		err = fmt.Errorf("segment %d is %s, previews need a CPU segment", loc.SegmentID, loc.Kind)
	}
	var b []byte
	if err == nil {
		b, err = m.host.Bytes(r)
	}
	if err != nil {
		_ = m.host.Free(r)
		return nil, nil, fmt.Errorf("alloc %s: %w", name, err)
	}
	return &pluginv1.Region{
		Segment: &pluginv1.Region_Cpu{Cpu: &pluginv1.CPUSegment{Id: loc.SegmentID, Path: loc.Path, Size: loc.Size, HostPid: int32(loc.HostPID)}},
		Offset:  r.Offset, Length: r.Length, Generation: r.Generation,
	}, b, nil
}

func (m arenaMemory) Free(r *pluginv1.Region) error {
	ar, err := arena.RegionFromProto(r)
	if err != nil {
		return err
	}
	return m.host.FreeOwned(arena.HostOwner, ar)
}
