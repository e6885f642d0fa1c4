package registry

import (
	"fmt"
	"math"

	"github.com/arenahost/arenahost/host/arena"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// Locator says where a region's segment lives, for descriptors.
// *arena.Arena satisfies it.
type Locator interface {
	Location(r arena.Region) (arena.Location, error)
}

// Descriptor returns the protocol descriptor of model's tensor name with the
// given access. For the packed tensor of a 4-bit weight it carries the
// QuantInfo with the regions of the side tensors. An empty tensor has no
// region and no descriptor.
func (r *Registry) Descriptor(loc Locator, model, name string, access pluginv1.Access) (*pluginv1.TensorDescriptor, error) {
	t, err := r.Tensor(model, name)
	if err != nil {
		return nil, fmt.Errorf("descriptor: %w", err)
	}
	d, err := DescriptorOf(loc, model, t, access)
	if err != nil {
		return nil, fmt.Errorf("descriptor: model %q: tensor %q: %w", model, name, err)
	}
	return d, nil
}

// DescriptorOf converts a registered tensor of model to a descriptor.
func DescriptorOf(loc Locator, model string, t *Tensor, access pluginv1.Access) (*pluginv1.TensorDescriptor, error) {
	dt, err := tensor.ParseDType(string(t.DType))
	if err != nil {
		return nil, err
	}
	reg, err := regionProto(loc, t)
	if err != nil {
		return nil, err
	}
	d := &pluginv1.TensorDescriptor{
		Name:   t.Name,
		Dtype:  dt,
		Shape:  append([]int64(nil), t.Shape...),
		Nbytes: t.NBytes,
		Access: access,
		Region: reg,
		Model:  model,
	}
	if q := t.Quant; q != nil {
		if d.Quant, err = quantProto(loc, q, dt); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func quantProto(loc Locator, q *QuantWeight, storage pluginv1.DType) (*pluginv1.QuantInfo, error) {
	logical, err := tensor.ParseDType(q.State.DType.SafetensorsDType())
	if err != nil {
		return nil, fmt.Errorf("logical dtype %q: %w", q.State.DType, err)
	}
	qi := &pluginv1.QuantInfo{
		QuantType:    string(q.State.QuantType),
		Blocksize:    uint32(q.State.Blocksize),
		Dtype:        logical,
		Shape:        append([]int64(nil), q.State.Shape...),
		Nested:       q.State.Nested,
		StorageDtype: storage,
	}
	if qi.Absmax, err = refProto(loc, q.Absmax); err != nil {
		return nil, err
	}
	if qi.QuantMap, err = refProto(loc, q.QuantMap); err != nil {
		return nil, err
	}
	if q.State.Nested {
		if q.State.NestedBlocksize > math.MaxUint32 || q.State.NestedBlocksize < 0 {
			return nil, fmt.Errorf("nested_blocksize %d out of range", q.State.NestedBlocksize)
		}
		qi.NestedBlocksize = uint32(q.State.NestedBlocksize)
		qi.NestedOffset = q.State.NestedOffset
		if qi.NestedAbsmax, err = refProto(loc, q.NestedAbsmax); err != nil {
			return nil, err
		}
		if qi.NestedQuantMap, err = refProto(loc, q.NestedQuantMap); err != nil {
			return nil, err
		}
	}
	return qi, nil
}

func refProto(loc Locator, t *Tensor) (*pluginv1.TensorRef, error) {
	dt, err := tensor.ParseDType(string(t.DType))
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	reg, err := regionProto(loc, t)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", t.Name, err)
	}
	return &pluginv1.TensorRef{Dtype: dt, Shape: append([]int64(nil), t.Shape...), Region: reg}, nil
}

func regionProto(loc Locator, t *Tensor) (*pluginv1.Region, error) {
	if t.NBytes == 0 {
		return nil, fmt.Errorf("tensor %q is empty: it has no region", t.Name)
	}
	l, err := loc.Location(t.Region)
	if err != nil {
		return nil, err
	}
	return arena.RegionProto(t.Region, l), nil
}
