package main

import (
	"context"
	"fmt"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"sort"
	"strings"
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
	d, err := s.c.Input(w)
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

// callJournal is the host's journal as the fused pass sees it: the host
// saved each layer's original packed bytes and absmax in host-owned
// regions before the call and passed them read-only. Restores copy them
// back; saving is the host's job, so a layer it did not journal fails.
type callJournal struct {
	c      *sdk.Call
	layers map[string][2]*pluginv1.TensorDescriptor
}

func newCallJournal(c *sdk.Call) callJournal {
	j := callJournal{c: c, layers: map[string][2]*pluginv1.TensorDescriptor{}}
	for _, d := range c.Inputs() {
		rest, ok := strings.CutPrefix(d.GetName(), "journal/")
		if !ok {
			continue
		}
		if w, ok := strings.CutSuffix(rest, "/packed"); ok {
			e := j.layers[strings.TrimSuffix(w, ".weight")]
			e[0] = d
			j.layers[strings.TrimSuffix(w, ".weight")] = e
		} else if w, ok := strings.CutSuffix(rest, "/absmax"); ok {
			e := j.layers[strings.TrimSuffix(w, ".weight")]
			e[1] = d
			j.layers[strings.TrimSuffix(w, ".weight")] = e
		}
	}
	return j
}

func (j callJournal) Has(layer string) bool { _, ok := j.layers[layer]; return ok }

func (j callJournal) Save(layer string, _ [][]byte) error {
	return fmt.Errorf("journal: layer %s: the host did not journal it before the call", layer)
}

func (j callJournal) Restore(layer string, raw [][]byte) error {
	e, ok := j.layers[layer]
	if !ok || e[0] == nil || e[1] == nil {
		return fmt.Errorf("journal: layer %s: not journaled (packed and absmax both needed)", layer)
	}
	if len(raw) != 2 {
		return fmt.Errorf("journal: layer %s: %d regions given, want 2", layer, len(raw))
	}
	for i, d := range e {
		b, err := j.c.Bytes(d)
		if err != nil {
			return fmt.Errorf("journal: layer %s: %w", layer, err)
		}
		if len(b) != len(raw[i]) {
			return fmt.Errorf("journal: layer %s region %d: %d bytes saved, %d in the weight", layer, i, len(b), len(raw[i]))
		}
	}
	for i, d := range e {
		b, _ := j.c.Bytes(d)
		copy(raw[i], b)
	}
	return nil
}

// Drop leaves the host's journal as it is: the host frees a layer's
// journal once it knows the layer holds its original bytes again.
func (j callJournal) Drop(string) error { return nil }

func (j callJournal) Layers() []string {
	out := make([]string, 0, len(j.layers))
	for l := range j.layers {
		out = append(out, l)
	}
	sort.Strings(out)
	return out
}

func (e *engine) applyFuse(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (lorawire.ApplyResult, error) {
	m, p, err := e.build(ctx, c, args)
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
		err = lora.Fuse(ctx, p, store, codec, newCallJournal(c), lora.FuseOptions{TileElems: args.TileElems})
	}
	if err != nil {
		// Both passes put back what they wrote before returning; the
		// caller may have gone (a cancelled call), so say so here too.
		c.Logger().Warn("fuse failed; the weights it wrote were rolled back", "model", modelName(args.Model), "device", device, "err", err)
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
