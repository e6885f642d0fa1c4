package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"slices"
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
	if d, err := s.c.Input(w); err == nil && d.GetQuant() == nil {
		return s.denseLayer(name, d)
	}
	d, err := fusable(s.c, w)
	if err != nil {
		return nil, err
	}
	q := d.GetQuant()
	packed, err := s.c.Bytes(d)
	if err != nil {
		return nil, err
	}
	ab, err := s.ref(w, "absmax", q.GetAbsmax(), true)
	if err != nil {
		return nil, err
	}
	l := &lora.QLayer{Name: name, Out: int(q.GetShape()[0]), In: int(q.GetShape()[1]), Blocksize: int(q.GetBlocksize()),
		Packed: packed, Raw: [][]byte{packed, ab}}
	if !q.GetNested() {
		if l.Absmax, err = tensor.Float32s(ab); err != nil {
			return nil, fmt.Errorf("weight %s: absmax: %w", w, err)
		}
		return l, nil
	}
	// Nested absmax: the pass works on the decoded fp32 absmax, and Commit
	// re-encodes it in place around the stored nested_offset with the
	// stored nested_quant_map, so the quant-state JSON stays as loaded.
	nb, err := s.ref(w, "nested_absmax", q.GetNestedAbsmax(), true)
	if err != nil {
		return nil, err
	}
	mb, err := s.ref(w, "nested_quant_map", q.GetNestedQuantMap(), false)
	if err != nil {
		return nil, err
	}
	nabs, err := tensor.Float32s(nb)
	if err != nil {
		return nil, fmt.Errorf("weight %s: nested_absmax: %w", w, err)
	}
	code, err := nestedMap(mb)
	if err != nil {
		return nil, fmt.Errorf("weight %s: nested_quant_map: %w", w, err)
	}
	off := float32(q.GetNestedOffset())
	l.Absmax = make([]float32, len(ab))
	nf4.DequantizeNested(l.Absmax, ab, nabs, code, off, nf4.NestedBlocksize)
	l.Raw = append(l.Raw, nb)
	l.Commit = func() error {
		nf4.QuantizeNestedInto(ab, nabs, l.Absmax, off, code)
		return nil
	}
	return l, nil
}

// denseLayer opens a bundled text encoder's plain weight the host passed
// for writing: the pass rewrites its values in place in their dtype.
func (s callStore) denseLayer(name string, d *pluginv1.TensorDescriptor) (*lora.QLayer, error) {
	w := d.GetName()
	if d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE {
		return nil, fmt.Errorf("weight %s passed %v, want read-write: %w", w, d.GetAccess(), sdk.ErrInvalidArgument)
	}
	if !isDenseTE(d) {
		return nil, fmt.Errorf("weight %s (%v %v) is neither a 2-D 4-bit weight nor a plain 2-D F32/F16/BF16/F8 weight of a bundled text encoder: %w", w, d.GetDtype(), d.GetShape(), sdk.ErrInvalidArgument)
	}
	dt, err := tensor.DTypeName(d.GetDtype())
	if err != nil {
		return nil, fmt.Errorf("weight %s: %w", w, err)
	}
	data, err := s.c.Bytes(d)
	if err != nil {
		return nil, err
	}
	return &lora.QLayer{Name: name, Out: int(d.GetShape()[0]), In: int(d.GetShape()[1]), Dense: dt, Data: data, Raw: [][]byte{data}}, nil
}

// ref maps one of weight w's quant-state tensors (what names it).
func (s callStore) ref(w, what string, ref *pluginv1.TensorRef, write bool) ([]byte, error) {
	n, err := tensor.NBytes(ref.GetDtype(), ref.GetShape())
	if err != nil {
		return nil, fmt.Errorf("weight %s: %s: %w", w, what, err)
	}
	b, err := s.mapper.Region(ref.GetRegion(), n, write)
	if err != nil {
		return nil, fmt.Errorf("weight %s: %s: %w", w, what, err)
	}
	return b, nil
}

// nestedMap decodes a stored nested_quant_map (fp32 [256], little-endian).
func nestedMap(b []byte) (*[256]float32, error) {
	v, err := tensor.Float32s(b)
	if err != nil {
		return nil, err
	}
	if len(v) != 256 {
		return nil, fmt.Errorf("%d values, want 256", len(v))
	}
	return (*[256]float32)(v), nil
}

// fusable returns the descriptor the host passed for writing weight w
// after the checks both fused passes (CPU and device) need: read-write, a
// 2-D 4-bit weight, and absmax stored as bitsandbytes stores it: fp32, or
// nested (uint8 codes, fp32 nested absmax per 256 blocks, an fp32 [256]
// map), which the passes re-encode around the stored nested_offset.
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
	case !q.GetNested() && q.GetAbsmax().GetDtype() != pluginv1.DType_DTYPE_F32:
		return nil, fmt.Errorf("weight %s: absmax dtype %v, want F32: %w", w, q.GetAbsmax().GetDtype(), sdk.ErrInvalidArgument)
	case q.GetNested():
		nb := int64(nf4.Blocks(int(q.GetShape()[0]*q.GetShape()[1]), int(q.GetBlocksize())))
		switch {
		case q.GetNestedBlocksize() != nf4.NestedBlocksize:
			return nil, fmt.Errorf("weight %s: nested_blocksize %d, want %d (bitsandbytes' only one): %w", w, q.GetNestedBlocksize(), nf4.NestedBlocksize, sdk.ErrFailedPrecondition)
		case q.GetAbsmax().GetDtype() != pluginv1.DType_DTYPE_U8 || !slices.Equal(q.GetAbsmax().GetShape(), []int64{nb}):
			return nil, fmt.Errorf("weight %s: nested absmax %v %v, want U8 [%d]: %w", w, q.GetAbsmax().GetDtype(), q.GetAbsmax().GetShape(), nb, sdk.ErrInvalidArgument)
		case q.GetNestedAbsmax().GetDtype() != pluginv1.DType_DTYPE_F32 || !slices.Equal(q.GetNestedAbsmax().GetShape(), []int64{int64(nf4.Blocks(int(nb), nf4.NestedBlocksize))}):
			return nil, fmt.Errorf("weight %s: nested_absmax %v %v, want F32 [%d]: %w", w, q.GetNestedAbsmax().GetDtype(), q.GetNestedAbsmax().GetShape(), nf4.Blocks(int(nb), nf4.NestedBlocksize), sdk.ErrInvalidArgument)
		case q.GetNestedQuantMap().GetDtype() != pluginv1.DType_DTYPE_F32 || !slices.Equal(q.GetNestedQuantMap().GetShape(), []int64{256}):
			return nil, fmt.Errorf("weight %s: nested_quant_map %v %v, want F32 [256]: %w", w, q.GetNestedQuantMap().GetDtype(), q.GetNestedQuantMap().GetShape(), sdk.ErrInvalidArgument)
		}
	}
	return d, nil
}

func (e *engine) applyFuse(ctx context.Context, c *sdk.Call, args lorawire.ApplyArgs) (lorawire.ApplyResult, error) {
	mu := e.pass(args.Model)
	mu.Lock()
	defer mu.Unlock()
	t0 := time.Now()
	m, p, err := e.build(ctx, c, args, true)
	if err != nil {
		return lorawire.ApplyResult{}, err
	}
	p.Report.AddPhase("parse and plan", time.Since(t0))
	qt, dt := nf4.QuantType(""), nf4.DType("")
	dense := ""
	for _, sl := range p.Layers {
		if _, ok := m.dense[sl.Name+".weight"]; ok {
			dense = sl.Name + ".weight" // a text encoder's plain weight: no quant type or codec
			continue
		}
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
	if device && dense != "" {
		err = e.fuseDeviceMixed(ctx, c, p, m, dt, args.TileElems)
	} else if device {
		err = e.fuseDevice(ctx, c, p, dt)
	} else {
		store := callStore{c: c, mapper: e.mapper, delay: e.delay, ctx: ctx}
		// The host keeps the originals (lorawire: apply, fuse) and passed
		// every weight holding them, so the pass journals nothing.
		t := time.Now()
		err = lora.Fuse(ctx, p, store, codec, nil, lora.FuseOptions{TileElems: args.TileElems, CallerRestores: true})
		p.Report.AddPhase("cpu fused pass", time.Since(t))
	}
	if errors.Is(err, lora.ErrNonFinite) {
		err = fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument) // the request's fault: 422 bad_lora
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

// fuseDeviceMixed fuses a set that touches 4-bit weights and a bundled
// text encoder's plain weights in device memory: the 4-bit ones with the
// device kernels (fuseDevice), the plain ones (small: an encoder's
// Linears) one at a time through the CPU pass, downloaded, fused and
// uploaded back. Each pass gets the plan's layers it handles, and the
// report's rows and totals are put together again.
func (e *engine) fuseDeviceMixed(ctx context.Context, c *sdk.Call, p *lora.Plan, m *model, dt nf4.DType, tile int) error {
	isDense := func(sl *lora.SideLayer) bool { _, ok := m.dense[sl.Name+".weight"]; return ok }
	qp, qi := subPlan(p, func(sl *lora.SideLayer) bool { return !isDense(sl) })
	dp, di := subPlan(p, isDense)
	if len(qp.Layers) > 0 {
		if err := e.fuseDevice(ctx, c, qp, dt); err != nil {
			return err
		}
	}
	t := time.Now()
	store := deviceDenseStore{e: e, c: c, ctx: ctx}
	if err := lora.Fuse(ctx, dp, store, nil, nil, lora.FuseOptions{TileElems: tile, CallerRestores: true}); err != nil {
		return err
	}
	dp.Report.AddPhase("text encoders' plain weights: download, CPU fused pass, upload", time.Since(t))
	rep := p.Report
	rep.Mode, rep.Warnings, rep.Phases = "fuse", nil, append(rep.Phases, qp.Report.Phases...)
	rep.Phases = append(rep.Phases, dp.Report.Phases...)
	var dot, norm, diff float64
	for _, part := range []struct {
		r   *lora.Report
		idx []int
	}{{qp.Report, qi}, {dp.Report, di}} {
		rep.Warnings = append(rep.Warnings, part.r.Warnings...)
		rep.PeakScratchBytes = max(rep.PeakScratchBytes, part.r.PeakScratchBytes)
		for k, i := range part.idx {
			lr := part.r.Layers[k]
			rep.Layers[i] = lr
			if n := lr.DeltaNorm2; n > 0 {
				dot += lr.Retention * n
				diff += lr.RelError * lr.RelError * n
				norm += n
			}
		}
	}
	rep.SetFit(dot, norm, diff)
	return nil
}

// subPlan returns p restricted to the layers keep selects, with a report
// of its own whose row k is the row of p's layer idx[k]. It shares p's
// layers and factor buffers (Materialize works on it as on p).
func subPlan(p *lora.Plan, keep func(*lora.SideLayer) bool) (*lora.Plan, []int) {
	q := *p
	r := *p.Report
	q.Layers, r.Layers, r.Phases, r.Warnings = nil, nil, nil, nil
	var idx []int
	for i, sl := range p.Layers {
		if keep(sl) {
			q.Layers = append(q.Layers, sl)
			r.Layers = append(r.Layers, p.Report.Layers[i])
			idx = append(idx, i)
		}
	}
	q.Report = &r
	return &q, idx
}

// deviceDenseStore serves a bundled text encoder's plain weights that lie
// in device memory to the CPU pass: a copy downloaded, uploaded back by
// Commit once the pass has written it.
type deviceDenseStore struct {
	e   *engine
	c   *sdk.Call
	ctx context.Context
}

func (s deviceDenseStore) Layer(name string) (*lora.QLayer, error) {
	w := name + ".weight"
	d, err := s.c.Input(w)
	if err != nil {
		return nil, fmt.Errorf("the host passed no writable descriptor: %w", err)
	}
	if d.GetAccess() != pluginv1.Access_ACCESS_READ_WRITE || !isDenseTE(d) {
		return nil, fmt.Errorf("weight %s (%v %v %v): want a read-write plain 2-D F32/F16/BF16/F8 weight of a bundled text encoder: %w", w, d.GetAccess(), d.GetDtype(), d.GetShape(), sdk.ErrInvalidArgument)
	}
	dt, err := tensor.DTypeName(d.GetDtype())
	if err != nil {
		return nil, fmt.Errorf("weight %s: %w", w, err)
	}
	dev, ptr, err := s.e.gpu.descAddr("weight "+w, d)
	if err != nil {
		return nil, err
	}
	data := make([]byte, d.GetNbytes())
	if err := dev.Download(data, ptr); err != nil {
		return nil, fmt.Errorf("weight %s: download: %w", w, err)
	}
	q := &lora.QLayer{Name: name, Out: int(d.GetShape()[0]), In: int(d.GetShape()[1]), Dense: dt, Data: data, Raw: [][]byte{data}}
	q.Commit = func() error {
		if err := dev.Upload(s.ctx, ptr, data); err != nil {
			return fmt.Errorf("weight %s: upload: %w", w, err)
		}
		return nil
	}
	return q, nil
}
