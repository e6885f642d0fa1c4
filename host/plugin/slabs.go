package plugin

import (
	"errors"
	"fmt"
	"slices"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// SlabHolders is told which plugin generation may have which device slab
// open: a legacy CUDA IPC handle does not keep a slab alive, so the device
// arena (host/cuda's Backend) frees a slab it closed only once no live
// generation holds it. The manager calls Opened for every CUDA slab a
// descriptor names before the descriptor goes to a generation (tensors
// passed with Call and Stream, Host.LookupTensors and Host.Allocate
// answers), and Released with no ids when a generation exits, crashes or
// is swapped out. Leave Config.Slabs nil for a host-mapped arena.
type SlabHolders interface {
	Opened(holder arena.Owner, segment uint32) error
	Released(holder arena.Owner, segments ...uint32) error
}

// cudaSlabs returns the ids of the CUDA slabs regions name, without
// repeats, in first-seen order.
func cudaSlabs(regions []*pluginv1.Region) []uint32 {
	var ids []uint32
	for _, r := range regions {
		if c, ok := r.GetSegment().(*pluginv1.Region_Cuda); ok && !slices.Contains(ids, c.Cuda.GetId()) {
			ids = append(ids, c.Cuda.GetId())
		}
	}
	return ids
}

// descriptorRegions appends every region a descriptor names: its own and
// those of its quantization side tensors.
func descriptorRegions(out []*pluginv1.Region, ds ...*pluginv1.TensorDescriptor) []*pluginv1.Region {
	for _, d := range ds {
		if d == nil {
			continue
		}
		out = append(out, d.GetRegion())
		if q := d.GetQuant(); q != nil {
			for _, ref := range []*pluginv1.TensorRef{q.GetAbsmax(), q.GetQuantMap(), q.GetNestedAbsmax(), q.GetNestedQuantMap()} {
				if ref != nil {
					out = append(out, ref.GetRegion())
				}
			}
		}
	}
	return out
}

// lookupRegions returns every region a LookupTensors answer names.
func lookupRegions(resp *pluginv1.LookupTensorsResponse) []*pluginv1.Region {
	out := descriptorRegions(nil, resp.GetTensors()...)
	for _, f := range resp.GetFactors() {
		out = descriptorRegions(out, f.GetA(), f.GetB())
	}
	return out
}

// opened records that owner may open every CUDA slab the regions name. It
// does nothing without SlabHolders (a host-mapped arena).
func (d hostDeps) opened(owner string, regions []*pluginv1.Region) error {
	if d.slabs == nil {
		return nil
	}
	var errs []error
	for _, id := range cudaSlabs(regions) {
		if err := d.slabs.Opened(arena.Owner(owner), id); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("hand device slabs to %s: %w", owner, err)
	}
	return nil
}

// released drops every slab open by owner, whose process is gone.
func (d hostDeps) released(owner string) error {
	if d.slabs == nil {
		return nil
	}
	return d.slabs.Released(arena.Owner(owner))
}
