package main

import (
	"context"
	"fmt"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"time"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// callStore opens the weights the host passed read-write with the call.
type callStore struct {
	c      *sdk.Call
	mapper *tensor.Mapper
	delay  time.Duration
	ctx    context.Context
}

func (s callStore) Layer(name string) (*lora.QLayer, error) {
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-s.ctx.Done():
			return nil, s.ctx.Err()
		}
	}
	w := name + ".weight"
	d, err := fusable(s.c, w)
	if err != nil {
		return nil, err
	}
	q := d.GetQuant()
	packed, err := s.c.Bytes(d)
	if err != nil {
		return nil, err
	}
	ref := q.GetAbsmax()
	n, err := tensor.NBytes(ref.GetDtype(), ref.GetShape())
	if err != nil {
		return nil, fmt.Errorf("weight %s: absmax: %w", w, err)
	}
	ab, err := s.mapper.Region(ref.GetRegion(), n, true)
	if err != nil {
		return nil, fmt.Errorf("weight %s: absmax: %w", w, err)
	}
	am, err := tensor.Float32s(ab)
	if err != nil {
		return nil, fmt.Errorf("weight %s: absmax: %w", w, err)
	}
	return &lora.QLayer{Name: name, Out: int(q.GetShape()[0]), In: int(q.GetShape()[1]), Blocksize: int(q.GetBlocksize()),
		Packed: packed, Absmax: am, Raw: [][]byte{packed, ab}}, nil
}

// fusable returns the descriptor the host passed for writing weight w
// after the checks both fused passes (CPU and device) need: read-write, a
// 2-D 4-bit weight, plain fp32 absmax (nested absmax would change the
// quant state's nested_offset).
func fusable(c *sdk.Call, w string) (*pluginv1.TensorDescriptor, error) {
	d, err := c.Input(w)
	if err != nil {
		return nil, fmt.Errorf("the host passed no writable descriptor: %w", err)
	}
	q := d.GetQuant()
	switch {
	case d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE:
		return nil, fmt.Errorf("weight %s passed %v, want read-write: %w", w, d.GetAccess(), sdk.ErrInvalidArgument)
	case q == nil || len(q.GetShape()) != 2:
		return nil, fmt.Errorf("weight %s is not a 2-D 4-bit weight: %w", w, sdk.ErrInvalidArgument)
	case q.GetNested():
		return nil, fmt.Errorf("weight %s has nested absmax: re-quantizing it would change nested_offset in the quant-state JSON; use side mode: %w", w, sdk.ErrFailedPrecondition)
	case q.GetAbsmax().GetDtype() != pluginv1.DType_DTYPE_F32:
		return nil, fmt.Errorf("weight %s: absmax dtype %v, want F32: %w", w, q.GetAbsmax().GetDtype(), sdk.ErrInvalidArgument)
	}
	return d, nil
}

func (e *engine) applyFuse(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (lorawire.ApplyResult, error) {
	mu := e.pass(args.Model)
	mu.Lock()
	defer mu.Unlock()
	m, p, err := e.build(ctx, c, args, true)
	if err != nil {
		return lorawire.ApplyResult{}, err
	}
	qt, dt := nf4.QuantType(""), nf4.DType("")
	for _, sl := range p.Layers {
		d := m.weights[sl.Name+".weight"]
		t := nf4.QuantType(d.GetQuant().GetQuantType())
		// The fused pass rounds the dequantized base to the weight's logical
		// dtype before adding the deltas, as bitsandbytes' dequantize_4bit
		// (and so PEFT's merge) does.
		ldt, ok := logicalDType[d.GetQuant().GetDtype()]
		if !ok {
			return lorawire.ApplyResult{}, fmt.Errorf("weight %s: logical dtype %v: want BF16, F16 or F32: %w", d.GetName(), d.GetQuant().GetDtype(), sdk.ErrFailedPrecondition)
		}
		if (qt != "" && t != qt) || (dt != "" && ldt != dt) {
			return lorawire.ApplyResult{}, fmt.Errorf("weight %s is %s %s but others are %s %s: fuse one quant type and dtype at a time: %w",
				d.GetName(), t, ldt, qt, dt, sdk.ErrFailedPrecondition)
		}
		qt, dt = t, ldt
	}
	if qt == "" {
		qt, dt = nf4.QuantNF4, nf4.BFloat16
	}
	codec, err := lora.NewNF4Codec(qt, dt)
	if err != nil {
		return lorawire.ApplyResult{}, fmt.Errorf("%w: %w", err, sdk.ErrFailedPrecondition)
	}
	// The weights' memory picks the pass: CUDA slabs get the device
	// kernels (fuse_device.go), CPU segments the tiled CPU pass.
	device, err := onDevice(c, p)
	if err != nil {
		return lorawire.ApplyResult{}, err
	}
	if device {
		err = e.fuseDevice(ctx, c, p, dt)
	} else {
		store := callStore{c: c, mapper: e.mapper, delay: e.delay, ctx: ctx}
		// The host keeps the originals (lorawire: apply, fuse) and passed
		// every weight holding them, so the pass journals nothing.
		err = lora.Fuse(ctx, p, store, codec, nil, lora.FuseOptions{TileElems: args.TileElems, CallerRestores: true})
	}
	if err != nil {
		// Neither pass writes after returning; the host puts back every
		// weight it passed. The caller may have gone (a cancelled call),
		// so say so here too.
		c.Logger().Warn("fuse failed; it stopped writing and leaves the weights it wrote to the host's rollback", "model", modelName(args.Model), "device", device, "err", err)
		return lorawire.ApplyResult{}, err
	}
	e.mu.Lock()
	delete(e.plans, modelName(args.Model)) // the side plan, if any, is no longer what the model holds
	e.mu.Unlock()
	res := lorawire.ApplyResult{Report: p.Report}
	for _, sl := range p.Layers {
		res.Fused = append(res.Fused, sl.Name+".weight")
	}
	return res, nil
}
