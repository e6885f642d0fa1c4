package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// The fused pass on device memory: the same result as lora.Fuse with
// lora.NF4Codec on CPU memory, byte for byte. Per layer (each holds its
// original bytes: the host restored it before the call), A_cat and
// B_cat (fp32, strengths folded: exactly the factors lora.Fuse's
// DeltaRows multiplies) go up into one scratch allocation and one
// gpu.FuseCall dequantizes, rounds to the logical dtype, adds B·A and
// re-quantizes in place, adding the layer's retention sums (Σ eff·delta,
// Σ delta², Σ (eff − delta)²) into its 3 float64 of a small stats
// buffer, read back once at the end for the report's retention, relative
// error and warnings, as lora.Fuse reports them. The kernels reproduce
// DeltaRows' summation order, so dense (full-rank) deltas, which DeltaRows
// adds after the factor sum, have no device form yet and are refused, as
// are FP4 weights (the fused kernels are NF4). A weight with nested absmax
// is decoded into an fp32 absmax scratch (nested_dequantize), fused there,
// and re-encoded around its stored nested_offset with its stored map
// (nested_quantize), as the CPU pass's Commit does.
//
// Each layer's kernel also ORs into the layer's flag word (after the
// retention sums, read back with them) when a merged weight would be NaN
// or ±Inf, or its re-quantized value infinite in the logical dtype: the
// CPU pass's checks. A flagged layer fails the pass with
// lora.ErrNonFinite naming it (422 bad_lora), and the host puts back
// every weight it passed, so the model is unchanged, as on the CPU.

// scratchAlign aligns B_cat after A_cat in the scratch allocation.
const scratchAlign = 256

var gpuDType = map[nf4.DType]int{nf4.Float32: gpu.DTypeF32, nf4.BFloat16: gpu.DTypeBF16, nf4.Float16: gpu.DTypeF16}

// devWeight is a 4-bit weight on the device as the pass writes it.
type devWeight struct {
	name           string // weight key
	dev            device
	blocksize      int
	packed, absmax gpu.DevicePtr // absmax: fp32, or the nested codes
	nPacked, nAbs  uint64
	nb             int         // absmax blocks
	nested         *gpu.Nested // nil unless absmax is nested
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
// and returns its addresses: fusable's checks, plus what the device pass
// needs.
func (e *engine) deviceWeight(c *sdk.Call, layer string, out, in int) (*devWeight, error) {
	w := layer + ".weight"
	d, err := fusable(c, w)
	if err != nil {
		return nil, err
	}
	q := d.GetQuant()
	switch {
	case nf4.QuantType(q.GetQuantType()) != nf4.QuantNF4:
		return nil, fmt.Errorf("weight %s is %q in CUDA device memory: the device fused pass has NF4 kernels only; use side mode: %w", w, q.GetQuantType(), sdk.ErrFailedPrecondition)
	case int(q.GetShape()[0]) != out || int(q.GetShape()[1]) != in:
		return nil, fmt.Errorf("weight %s: shape %v, the plan has [%d %d]: %w", w, q.GetShape(), out, in, sdk.ErrInvalidArgument)
	}
	bs := int(q.GetBlocksize())
	if bs <= 0 || bs%2 != 0 {
		return nil, fmt.Errorf("weight %s: blocksize %d: %w", w, bs, sdk.ErrInvalidArgument)
	}
	n := int(q.GetShape()[0] * q.GetShape()[1])
	nb := (n + bs - 1) / bs
	dw := &devWeight{name: w, blocksize: bs, nPacked: uint64((n + 1) / 2), nAbs: uint64(4 * nb), nb: nb}
	if q.GetNested() {
		dw.nAbs = uint64(nb) // uint8 codes; fusable checked the nested tensors' shapes
	}
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
	if !q.GetNested() {
		return dw, nil
	}
	n2 := &gpu.Nested{Q: dw.absmax, Offset: float32(q.GetNestedOffset())}
	for _, r := range []struct {
		what string
		ref  *pluginv1.TensorRef
		dst  *gpu.DevicePtr
		n    uint64
	}{
		{"nested_absmax", q.GetNestedAbsmax(), &n2.Absmax, uint64(4 * nf4.Blocks(nb, nf4.NestedBlocksize))},
		{"nested_quant_map", q.GetNestedQuantMap(), &n2.Map, 4 * 256},
	} {
		if !isCUDA(r.ref.GetRegion()) {
			return nil, fmt.Errorf("weight %s: packed codes in CUDA device memory but %s in CPU memory: %w", w, r.what, sdk.ErrInvalidArgument)
		}
		if _, *r.dst, err = e.gpu.addr("weight "+w+": "+r.what, r.ref.GetRegion(), r.n); err != nil {
			return nil, err
		}
	}
	dw.nested = n2
	return dw, nil
}

// fuseDevice runs the fused pass on device memory and fills the plan's
// report, per-layer and overall retention and relative error included
// (measured by the kernels: the sums differ from lora.Fuse's only in
// their order).
func (e *engine) fuseDevice(ctx context.Context, c *sdk.Call, p *lora.Plan, dt nf4.DType) (err error) {
	start := time.Now()
	gdt, ok := gpuDType[dt]
	if !ok {
		return fmt.Errorf("fuse on device: logical dtype %q: %w", dt, sdk.ErrFailedPrecondition)
	}
	// Check everything before the first write.
	tCheck := time.Now()
	weights := make([]*devWeight, len(p.Layers))
	var total, largest, absScratch uint64
	for i, sl := range p.Layers {
		if sl.HasDense() {
			return fmt.Errorf("fuse: layer %s: a full-rank (dense) delta, which the device fused pass does not apply yet; use side mode or CPU memory: %w", sl.Name, sdk.ErrFailedPrecondition)
		}
		if sl.Rank == 0 {
			return fmt.Errorf("fuse: layer %s: nothing to fuse: %w", sl.Name, sdk.ErrInvalidArgument)
		}
		w, err := e.deviceWeight(c, sl.Name, sl.Out, sl.In)
		if err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		if _, err := gpu.PlanFuse(gpu.FuseShape{Out: sl.Out, In: sl.In, Blocksize: w.blocksize, Rank: sl.Rank}); err != nil {
			return fmt.Errorf("fuse: layer %s: %w: %w", sl.Name, err, sdk.ErrFailedPrecondition)
		}
		weights[i] = w
		if w.nested != nil {
			absScratch = max(absScratch, uint64(4*w.nb))
		}
		total += slotBytes(sl)
		largest = max(largest, slotBytes(sl))
	}
	// The scratch holds a batch of consecutive layers' factors: at most
	// e.batch bytes (a layer larger than that goes alone), and never more
	// than the whole set's.
	factors := min(total, max(uint64(e.batch), largest))
	need := factors
	if len(weights) == 0 {
		return fmt.Errorf("fuse on device: the set touches no layer: %w", sdk.ErrInvalidArgument)
	}
	dev := weights[0].dev
	p.Report.AddPhase("check weights", time.Since(tCheck))

	e.gpu.fuse.Lock()
	defer e.gpu.fuse.Unlock()
	// A nested weight's absmax is decoded into fp32 after the factors
	// (aligned), one layer at a time: the stream orders the layers.
	absOff := (factors + scratchAlign - 1) / scratchAlign * scratchAlign
	if absScratch > 0 {
		need = absOff + absScratch
	}
	scratch, err := dev.MemAlloc(max(need, 1))
	if err != nil {
		return fmt.Errorf("fuse: allocate %d bytes of device scratch: %w", need, err)
	}
	defer func() {
		if ferr := dev.MemFree(scratch); ferr != nil && err == nil {
			err = fmt.Errorf("fuse: free device scratch: %w", ferr)
		}
	}()
	// The retention sums: 3 float64 per layer, then a uint32 flag word
	// per layer (gpu.FuseLayer.Flags), zeroed before the kernels add and
	// OR into them.
	sumsLen := uint64(statsBytes * len(p.Layers))
	statsLen := sumsLen + uint64(4*len(p.Layers))
	stats, err := dev.MemAlloc(statsLen)
	if err != nil {
		return fmt.Errorf("fuse: allocate %d bytes of device memory for the retention sums: %w", statsLen, err)
	}
	defer func() {
		if ferr := dev.MemFree(stats); ferr != nil && err == nil {
			err = fmt.Errorf("fuse: free the retention sums: %w", ferr)
		}
	}()
	if err := dev.Upload(ctx, stats, make([]byte, statsLen)); err != nil {
		return fmt.Errorf("fuse: zero the retention sums: %w", err)
	}
	// On failure the pass stops before its next layer and leaves what it
	// wrote to the host, which puts back every weight it passed; the
	// stream is drained first, so nothing is written after the return.
	defer func() {
		if err == nil {
			return
		}
		if serr := dev.Sync(); serr != nil {
			err = fmt.Errorf("%w (and device sync: %v)", err, serr)
		}
	}()
	// Each batch: the factors of consecutive layers written into one host
	// buffer, on every core (lora.Plan.FactorsInto), one upload (it waits
	// for the stream's earlier work, so the previous batch's kernels have
	// read the scratch), then one kernel per layer. The next batch is
	// written while those kernels run.
	hostBytes, err := e.gpu.uploadBuffer(dev, int(factors))
	if err != nil {
		return fmt.Errorf("fuse: %w", err)
	}
	host := unsafe.Slice((*float32)(unsafe.Pointer(unsafe.SliceData(hostBytes))), len(hostBytes)/4)
	var tFactors, tUpload, tLaunch time.Duration
	for _, b := range batches(p.Layers, uint64(e.batch)) {
		// A cancellation stops between batches (and, with the debugging
		// delay, between layers).
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("fuse: %w", err)
		}
		offs := make([]uint64, b.hi-b.lo)
		var used uint64
		for i := b.lo; i < b.hi; i++ {
			offs[i-b.lo] = used
			used += slotBytes(p.Layers[i])
		}
		t := time.Now()
		parallel(b.hi-b.lo, func(k int) {
			sl, off := p.Layers[b.lo+k], offs[k]
			p.FactorsInto(sl, host[off/4:], host[(off+scratchB(sl))/4:])
		})
		tFactors += time.Since(t)
		t = time.Now()
		if err := dev.Upload(ctx, scratch, hostBytes[:used]); err != nil {
			return fmt.Errorf("fuse: upload the factors of %d layers from %s: %w", b.hi-b.lo, p.Layers[b.lo].Name, err)
		}
		tUpload += time.Since(t)
		t = time.Now()
		for i := b.lo; i < b.hi; i++ {
			if e.delay > 0 {
				select {
				case <-time.After(e.delay):
				case <-ctx.Done():
					return fmt.Errorf("fuse: %w", ctx.Err())
				}
			}
			if err := e.launchFuse(dev, p.Layers[i], weights[i], scratch, offs[i-b.lo], absOff, gdt,
				stats+gpu.DevicePtr(statsBytes*i), stats+gpu.DevicePtr(sumsLen+uint64(4*i))); err != nil {
				return err
			}
		}
		tLaunch += time.Since(t)
	}
	p.Report.AddPhase("write factors", tFactors)
	p.Report.AddPhase("upload factors (after the previous batch's kernels)", tUpload)
	p.Report.AddPhase("launch kernels", tLaunch)
	tDrain := time.Now()
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("fuse: device sync: %w", err)
	}
	sums := make([]byte, statsLen)
	if err := dev.Download(sums, stats); err != nil {
		return fmt.Errorf("fuse: download the retention sums: %w", err)
	}
	for i, sl := range p.Layers {
		if f := binary.LittleEndian.Uint32(sums[sumsLen+uint64(4*i):]); f != 0 {
			return fmt.Errorf("fuse: layer %s: %w: %s: lower the strength or check the LoRA's values", sl.Name, lora.ErrNonFinite, gpu.FuseFlagsError(f))
		}
	}
	rep := p.Report
	rep.Mode = "fuse"
	rep.Warnings = nil
	var dot, norm, diff float64
	for i, sl := range p.Layers {
		d, n, e := statAt(sums, i, 0), statAt(sums, i, 1), statAt(sums, i, 2)
		rep.SetLayerFit(i, sl.Name, d, n, e, lora.DefaultWarnRetention)
		dot, norm, diff = dot+d, norm+n, diff+e
	}
	rep.SetFit(dot, norm, diff)
	rep.AddPhase("last kernels and retention sums", time.Since(tDrain))
	rep.PeakScratchBytes = int64(need)
	rep.Elapsed = time.Since(start)
	return nil
}

// launchFuse queues one layer's fused merge, its factors at off in the
// scratch: the kernel, and around it the nested absmax decode into the
// scratch at absOff and the re-encode.
func (e *engine) launchFuse(dev device, sl *lora.SideLayer, w *devWeight, scratch gpu.DevicePtr, off, absOff uint64, gdt int, stats, flags gpu.DevicePtr) error {
	a := scratch + gpu.DevicePtr(off)
	absmax := w.absmax
	var calls []gpu.Call
	if w.nested != nil {
		absmax = scratch + gpu.DevicePtr(absOff)
		call, err := gpu.NestedDequantizeCall(*w.nested, w.nb, absmax)
		if err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		calls = append(calls, call)
	}
	call, err := gpu.FuseCall(gpu.FuseLayer{Packed: w.packed, Absmax: absmax, Out: sl.Out, In: sl.In,
		Blocksize: w.blocksize, A: a, B: a + gpu.DevicePtr(scratchB(sl)), Rank: sl.Rank, DType: gdt, Flags: flags, Stats: stats})
	if err != nil {
		return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
	}
	calls = append(calls, call)
	if w.nested != nil {
		call, err := gpu.NestedQuantizeCall(absmax, w.nb, *w.nested)
		if err != nil {
			return fmt.Errorf("fuse: layer %s: %w", sl.Name, err)
		}
		calls = append(calls, call)
	}
	for _, call := range calls {
		if err := dev.Launch(call); err != nil {
			return fmt.Errorf("fuse: layer %s: launch %s: %w", sl.Name, call.Kernel, err)
		}
	}
	return nil
}

// span is the layers [lo, hi) of one upload batch.
type span struct{ lo, hi int }

// batches splits layers into runs of consecutive layers whose slots
// together fit limit bytes; a layer larger than limit goes alone.
func batches(layers []*lora.SideLayer, limit uint64) []span {
	var out []span
	var used uint64
	lo := 0
	for i, sl := range layers {
		if i > lo && used+slotBytes(sl) > limit {
			out = append(out, span{lo, i})
			lo, used = i, 0
		}
		used += slotBytes(sl)
	}
	if lo < len(layers) {
		out = append(out, span{lo, len(layers)})
	}
	return out
}

// parallel calls fn(0) … fn(n-1) on up to GOMAXPROCS goroutines.
func parallel(n int, fn func(int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := int(next.Add(1) - 1); k < n; k = int(next.Add(1) - 1) {
				fn(k)
			}
		}()
	}
	wg.Wait()
}

// statsBytes is one layer's retention sums on the device: 3 float64.
const statsBytes = 24

// statAt is layer i's k-th retention sum in the downloaded buffer.
func statAt(b []byte, i, k int) float64 {
	return math.Float64frombits(binary.LittleEndian.Uint64(b[statsBytes*i+8*k:]))
}

// scratchB is the offset of B_cat in a layer's slot: after A_cat, aligned.
func scratchB(sl *lora.SideLayer) uint64 {
	return (uint64(4*sl.Rank*sl.In) + scratchAlign - 1) / scratchAlign * scratchAlign
}

// slotBytes is a layer's slot in the scratch (A_cat, then B_cat), rounded
// up so that the next layer's slot starts aligned.
func slotBytes(sl *lora.SideLayer) uint64 {
	return (scratchB(sl) + uint64(4*sl.Out*sl.Rank) + scratchAlign - 1) / scratchAlign * scratchAlign
}
