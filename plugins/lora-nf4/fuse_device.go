package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// The fused pass on device memory: the same result as lora.Fuse with
// lora.NF4Codec on CPU memory, byte for byte. Per layer, the weight gets
// its journaled original back (a device-to-device copy), then A_cat and
// B_cat (fp32, strengths folded: exactly the factors lora.Fuse's
// DeltaRows multiplies) go up into one scratch allocation and one
// gpu.FuseCall dequantizes, rounds to the logical dtype, adds B·A and
// re-quantizes in place. The kernels reproduce DeltaRows' summation order,
// so dense (full-rank) deltas, which DeltaRows adds after the factor sum,
// have no device form yet and are refused, as are FP4 weights (the fused
// kernels are NF4) and nested absmax (as on the CPU).

// scratchAlign aligns B_cat after A_cat in the scratch allocation.
const scratchAlign = 256

var gpuDType = map[nf4.DType]int{nf4.Float32: gpu.DTypeF32, nf4.BFloat16: gpu.DTypeBF16, nf4.Float16: gpu.DTypeF16}

// devWeight is a 4-bit weight on the device as the pass writes it, with
// the host's journal of its original bytes.
type devWeight struct {
	name           string // weight key
	dev            device
	blocksize      int
	packed, absmax gpu.DevicePtr
	nPacked, nAbs  uint64
	journal        [2]*pluginv1.TensorDescriptor // packed, absmax
}

// onDevice reports whether the call's weights for the plan are on CUDA
// slabs; a set split across CPU and device memory is refused.
func onDevice(c *sdk.Call, p *lora.Plan) (bool, error) {
	var cpu, cuda string
	for _, sl := range p.Layers {
		w := sl.Name + ".weight"
		d, err := c.Input(w)
		if err != nil {
			continue // the CPU pass reports the missing descriptor
		}
		if isCUDA(d.GetRegion()) {
			cuda = w
		} else {
			cpu = w
		}
	}
	if cpu != "" && cuda != "" {
		return false, fmt.Errorf("weight %s is in CUDA device memory but %s is in CPU memory: fuse one memory at a time: %w", cuda, cpu, sdk.ErrFailedPrecondition)
	}
	return cuda != "", nil
}

// deviceWeight checks a weight the host passed for writing on the device
// and returns its addresses; it mirrors callStore.Layer's checks. out < 0
// takes the stored shape (a layer only restored).
func (e *engine) deviceWeight(c *sdk.Call, j callJournal, layer string, out, in int) (*devWeight, error) {
	w := layer + ".weight"
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
	case nf4.QuantType(q.GetQuantType()) != nf4.QuantNF4:
		return nil, fmt.Errorf("weight %s is %q in CUDA device memory: the device fused pass has NF4 kernels only; use side mode: %w", w, q.GetQuantType(), sdk.ErrFailedPrecondition)
	case out >= 0 && (int(q.GetShape()[0]) != out || int(q.GetShape()[1]) != in):
		return nil, fmt.Errorf("weight %s: shape %v, the plan has [%d %d]: %w", w, q.GetShape(), out, in, sdk.ErrInvalidArgument)
	}
	bs := int(q.GetBlocksize())
	if bs <= 0 || bs%2 != 0 {
		return nil, fmt.Errorf("weight %s: blocksize %d: %w", w, bs, sdk.ErrInvalidArgument)
	}
	n := int(q.GetShape()[0] * q.GetShape()[1])
	dw := &devWeight{name: w, blocksize: bs, nPacked: uint64((n + 1) / 2), nAbs: uint64(4 * ((n + bs - 1) / bs))}
	if d.GetNbytes() != dw.nPacked {
		return nil, fmt.Errorf("weight %s: %d packed bytes, want %d: %w", w, d.GetNbytes(), dw.nPacked, sdk.ErrInvalidArgument)
	}
	if !isCUDA(q.GetAbsmax().GetRegion()) {
		return nil, fmt.Errorf("weight %s: packed codes in CUDA device memory but absmax in CPU memory: %w", w, sdk.ErrInvalidArgument)
	}
	nAbs, err := tensor.NBytes(q.GetAbsmax().GetDtype(), q.GetAbsmax().GetShape())
	if err != nil || nAbs != dw.nAbs {
		return nil, fmt.Errorf("weight %s: absmax %v holds %d bytes, want %d (%v): %w", w, q.GetAbsmax().GetShape(), nAbs, dw.nAbs, err, sdk.ErrInvalidArgument)
	}
	if dw.dev, dw.packed, err = e.gpu.descAddr("weight "+w, d); err != nil {
		return nil, err
	}
	if _, dw.absmax, err = e.gpu.addr("weight "+w+": absmax", q.GetAbsmax().GetRegion(), dw.nAbs); err != nil {
		return nil, err
	}
	jd, ok := j.layers[layer]
	if !ok || jd[0] == nil || jd[1] == nil {
		return nil, fmt.Errorf("journal: layer %s: the host did not journal it before the call (packed and absmax both needed): %w", layer, sdk.ErrFailedPrecondition)
	}
	for i, want := range []uint64{dw.nPacked, dw.nAbs} {
		if err := tensor.Check(jd[i]); err != nil {
			return nil, fmt.Errorf("journal: layer %s: %w: %w", layer, err, sdk.ErrInvalidArgument)
		}
		if jd[i].GetNbytes() != want {
			return nil, fmt.Errorf("journal: layer %s: %s holds %d bytes, the weight %d: %w", layer, jd[i].GetName(), jd[i].GetNbytes(), want, sdk.ErrInvalidArgument)
		}
		if isCUDA(jd[i].GetRegion()) {
			if _, _, err := e.gpu.descAddr("tensor "+jd[i].GetName(), jd[i]); err != nil {
				return nil, err
			}
		} else if _, err := c.Bytes(jd[i]); err != nil { // uploaded from the CPU
			return nil, fmt.Errorf("journal: layer %s: %w", layer, err)
		}
	}
	dw.journal = jd
	return dw, nil
}

// restore enqueues the copy of a weight's journaled original into it:
// device to device, or up from a journal the host kept in CPU memory.
func (e *engine) restore(ctx context.Context, c *sdk.Call, dev device, w *devWeight) error {
	for i, dst := range []gpu.DevicePtr{w.packed, w.absmax} {
		jd := w.journal[i]
		if isCUDA(jd.GetRegion()) {
			_, src, err := e.gpu.descAddr("tensor "+jd.GetName(), jd)
			if err != nil {
				return err
			}
			if err := dev.CopyAsync(dst, src, jd.GetNbytes()); err != nil {
				return fmt.Errorf("journal: weight %s: copy %s back: %w", w.name, jd.GetName(), err)
			}
			continue
		}
		b, err := c.Bytes(jd)
		if err != nil {
			return fmt.Errorf("journal: weight %s: %w", w.name, err)
		}
		if err := dev.Upload(ctx, dst, b); err != nil {
			return fmt.Errorf("journal: weight %s: upload %s: %w", w.name, jd.GetName(), err)
		}
	}
	return nil
}

// fuseDevice runs the fused pass on device memory and fills the plan's
// report (retention is not measured on the device: it would need the
// delta on the CPU).
func (e *engine) fuseDevice(ctx context.Context, c *sdk.Call, p *lora.Plan, dt nf4.DType) (err error) {
	start := time.Now()
	gdt, ok := gpuDType[dt]
	if !ok {
		return fmt.Errorf("fuse on device: logical dtype %q: %w", dt, sdk.ErrFailedPrecondition)
	}
	j := newCallJournal(c)
	// Check everything before the first write.
	weights := make([]*devWeight, len(p.Layers))
	touched := map[string]bool{}
	var need uint64
	for i, sl := range p.Layers {
		touched[sl.Name] = true
		if sl.Dense != nil {
			return fmt.Errorf("fuse: layer %s: a full-rank (dense) delta, which the device fused pass does not apply yet; use side mode or CPU memory: %w", sl.Name, sdk.ErrFailedPrecondition)
		}
		if sl.Rank == 0 {
			return fmt.Errorf("fuse: layer %s: nothing to fuse: %w", sl.Name, sdk.ErrInvalidArgument)
		}
		w, err := e.deviceWeight(c, j, sl.Name, sl.Out, sl.In)
		if err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		if _, err := gpu.PlanFuse(gpu.FuseShape{Out: sl.Out, In: sl.In, Blocksize: w.blocksize, Rank: sl.Rank}); err != nil {
			return fmt.Errorf("fuse: layer %s: %w: %w", sl.Name, err, sdk.ErrFailedPrecondition)
		}
		weights[i] = w
		need = max(need, scratchB(sl)+uint64(4*sl.Out*sl.Rank))
	}
	var stale []*devWeight // journaled layers the set no longer touches
	for _, name := range j.Layers() {
		if touched[name] {
			continue
		}
		w, err := e.deviceWeight(c, j, name, -1, -1)
		if err != nil {
			return fmt.Errorf("fuse: restore layer %s no longer patched: %w", name, err)
		}
		stale = append(stale, w)
	}
	if len(weights) == 0 {
		return fmt.Errorf("fuse on device: the set touches no layer: %w", sdk.ErrInvalidArgument)
	}
	dev := weights[0].dev

	e.gpu.fuse.Lock()
	defer e.gpu.fuse.Unlock()
	scratch, err := dev.MemAlloc(max(need, 1))
	if err != nil {
		return fmt.Errorf("fuse: allocate %d bytes of device scratch: %w", need, err)
	}
	defer func() {
		if ferr := dev.MemFree(scratch); ferr != nil && err == nil {
			err = fmt.Errorf("fuse: free device scratch: %w", ferr)
		}
	}()
	// On failure every weight this call wrote gets its journaled original
	// back (the host then puts back what previously fused weights held).
	var written []*devWeight
	defer func() {
		if err == nil {
			return
		}
		var rerr []error
		for _, w := range written {
			rerr = append(rerr, e.restore(context.WithoutCancel(ctx), c, dev, w))
		}
		rerr = append(rerr, dev.Sync())
		if re := errors.Join(rerr...); re != nil {
			err = fmt.Errorf("%w (and rollback: %v)", err, re)
		}
	}()
	for i, sl := range p.Layers {
		if e.delay > 0 {
			select {
			case <-time.After(e.delay):
			case <-ctx.Done():
			}
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("fuse: %w", err)
		}
		w := weights[i]
		written = append(written, w)
		if err := e.restore(ctx, c, dev, w); err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		// Upload waits for the stream's earlier work, so the previous
		// layer's kernel has read the scratch before it is overwritten.
		a, b := scratch, scratch+gpu.DevicePtr(scratchB(sl))
		if err := dev.Upload(ctx, a, f32Bytes(sl.A)); err != nil {
			return fmt.Errorf("fuse: layer %s: upload A_cat: %w", sl.Name, err)
		}
		if err := dev.Upload(ctx, b, f32Bytes(sl.B)); err != nil {
			return fmt.Errorf("fuse: layer %s: upload B_cat: %w", sl.Name, err)
		}
		call, err := gpu.FuseCall(gpu.FuseLayer{Packed: w.packed, Absmax: w.absmax, Out: sl.Out, In: sl.In,
			Blocksize: w.blocksize, A: a, B: b, Rank: sl.Rank, DType: gdt})
		if err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		if err := dev.Launch(call); err != nil {
			return fmt.Errorf("fuse: layer %s: launch %s: %w", sl.Name, call.Kernel, err)
		}
	}
	for _, w := range stale {
		written = append(written, w)
		if err := e.restore(ctx, c, dev, w); err != nil {
			return fmt.Errorf("fuse: restore layer %s no longer patched: %w", w.name, err)
		}
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("fuse: device sync: %w", err)
	}
	rep := p.Report
	rep.Mode = "fuse"
	rep.Warnings = nil
	rep.PeakScratchBytes = int64(need)
	rep.Elapsed = time.Since(start)
	return nil
}

// scratchB is the offset of B_cat in the scratch: after A_cat, aligned.
func scratchB(sl *lora.SideLayer) uint64 {
	return (uint64(4*sl.Rank*sl.In) + scratchAlign - 1) / scratchAlign * scratchAlign
}
