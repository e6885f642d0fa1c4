package server

import (
	"context"
	"errors"
	"fmt"

	"github.com/arenahost/arenahost/host/registry"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// lookup serves the Host service's LookupTensors from the registry.
type lookup struct {
	reg      *registry.Registry
	loc      registry.Locator
	bindings *registry.Bindings // nil: no LoRA factors are ever bound
}

func (l lookup) LookupTensors(_ context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	model := req.GetModel()
	if model == "" {
		model = DefaultModelName
	}
	if _, ok := l.reg.Model(model); !ok {
		return nil, fmt.Errorf("model %q: %w", model, registry.ErrNotFound)
	}
	var ts []*registry.Tensor
	for _, n := range req.GetNames() {
		t, err := l.reg.Tensor(model, n)
		if err != nil {
			return nil, err
		}
		ts = append(ts, t)
	}
	if req.GetPrefix() != "" || len(req.GetNames()) == 0 {
		more, err := l.reg.Tensors(model, req.GetPrefix())
		if err != nil && !errors.Is(err, registry.ErrNotFound) {
			return nil, err
		}
		ts = append(ts, more...)
	}
	resp := &pluginv1.LookupTensorsResponse{}
	for _, t := range ts {
		if t.NBytes == 0 || t.QuantOf != "" {
			continue // empty tensors have no region; side tensors travel inside their weight's QuantInfo
		}
		d, err := registry.DescriptorOf(l.loc, model, t, pluginv1.Access_ACCESS_READ_ONLY)
		if err != nil {
			return nil, err
		}
		resp.Tensors = append(resp.Tensors, d)
		if req.GetIncludeFactors() && l.bindings != nil && (t.Quant != nil || len(t.Shape) == 2) {
			lf, err := l.factors(model, t.Name)
			if err != nil {
				return nil, err
			}
			if lf != nil {
				resp.Factors = append(resp.Factors, lf)
			}
		}
	}
	return resp, nil
}

// factors returns the side factors bound to weight, read-only, or nil.
func (l lookup) factors(model, weight string) (*pluginv1.LayerFactors, error) {
	f, gen, ok := l.bindings.Get(model, weight)
	if !ok {
		return nil, nil
	}
	lf := &pluginv1.LayerFactors{Layer: weight, BindingGeneration: gen}
	ts, err := f.Tensors(weight+".lora_A", weight+".lora_B")
	if err != nil {
		return nil, err
	}
	for i, t := range ts {
		d, err := registry.DescriptorOf(l.loc, model, t, pluginv1.Access_ACCESS_READ_ONLY)
		if err != nil {
			return nil, fmt.Errorf("factors of %s: %w", weight, err)
		}
		if i == 0 {
			lf.A = d
		} else {
			lf.B = d
		}
	}
	return lf, nil
}

// LookupTensors answers a Host-service lookup as a plugin would get it
// (descriptors read-only, bound LoRA factors with include_factors): for
// in-process callers and tests.
func (s *Server) LookupTensors(ctx context.Context, req *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	return lookup{reg: s.Registry, loc: s.Arena, bindings: s.Bindings}.LookupTensors(ctx, req)
}
