package main

import (
	"context"
	"fmt"
	"unsafe"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/lora"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// factors is one layer's bound side factors A' [R' × In] and B' [Out × R']
// in the regions the host allocated: mapped in place on a CPU segment, or
// device addresses on a CUDA slab (written by Upload from a CPU copy).
type factors struct {
	name       [2]string // the descriptors' names, for errors
	a, b       []float32 // CPU views
	dev        device    // set when both are on the device
	aPtr, bPtr gpu.DevicePtr
}

// factorView opens a layer's A' and B' descriptors, CPU or device; both
// must be on the same kind of memory.
func (e *engine) factorView(c *sdk.Call, w string, a, b *pluginv1.TensorDescriptor) (*factors, error) {
	f := &factors{name: [2]string{a.GetName(), b.GetName()}}
	if ca, cb := isCUDA(a.GetRegion()), isCUDA(b.GetRegion()); ca != cb {
		return nil, fmt.Errorf("layer %s: factors %s and %s are on different memories (one CPU, one CUDA): %w", w, a.GetName(), b.GetName(), sdk.ErrInvalidArgument)
	} else if !ca {
		var err error
		if f.a, err = c.Float32s(a); err != nil {
			return nil, err
		}
		if f.b, err = c.Float32s(b); err != nil {
			return nil, err
		}
		return f, nil
	}
	for _, d := range []*pluginv1.TensorDescriptor{a, b} {
		if d.GetDtype() != pluginv1.DType_DTYPE_F32 {
			return nil, fmt.Errorf("tensor %q: dtype %v, want F32: %w", d.GetName(), d.GetDtype(), sdk.ErrInvalidArgument)
		}
	}
	var err error
	if f.dev, f.aPtr, err = e.gpu.descAddr("tensor "+a.GetName(), a); err != nil {
		return nil, err
	}
	if _, f.bPtr, err = e.gpu.descAddr("tensor "+b.GetName(), b); err != nil {
		return nil, err
	}
	return f, nil
}

// writeAll writes the whole of A' and B' from the layer's side state.
func (f *factors) writeAll(ctx context.Context, sl *lora.SideLayer) error {
	rr := boundRank(sl)
	if f.dev == nil {
		writeA(f.a, sl)
		writeBCols(f.b, sl, 0, rr)
		return nil
	}
	a, b := make([]float32, rr*sl.In), make([]float32, sl.Out*rr)
	writeA(a, sl)
	writeBCols(b, sl, 0, rr)
	if err := f.upload(ctx, 0, f.aPtr, a, 0); err != nil {
		return err
	}
	return f.upload(ctx, 1, f.bPtr, b, 0)
}

// rewrite publishes what a strength change touched: B's changed columns
// (on the device B' is small and strided, so all of it goes up) and the
// dense rows of A'.
func (f *factors) rewrite(ctx context.Context, sl *lora.SideLayer, tc lora.Touched) error {
	rr := boundRank(sl)
	if f.dev == nil {
		if tc.Cols > 0 {
			writeBCols(f.b, sl, tc.Col, tc.Col+tc.Cols)
		}
		if tc.Dense && sl.Dense != nil {
			copy(f.a[sl.Rank*sl.In:], sl.Dense)
		}
		return nil
	}
	if tc.Cols > 0 {
		b := make([]float32, sl.Out*rr)
		writeBCols(b, sl, 0, rr)
		if err := f.upload(ctx, 1, f.bPtr, b, 0); err != nil {
			return err
		}
	}
	if tc.Dense && sl.Dense != nil {
		return f.upload(ctx, 0, f.aPtr, sl.Dense, uint64(4*sl.Rank*sl.In))
	}
	return nil
}

func (f *factors) upload(ctx context.Context, k int, base gpu.DevicePtr, v []float32, off uint64) error {
	if err := f.dev.Upload(ctx, base+gpu.DevicePtr(off), f32Bytes(v)); err != nil {
		return fmt.Errorf("tensor %s: upload %d bytes at %d: %w", f.name[k], 4*len(v), off, err)
	}
	return nil
}

// f32Bytes views float32s as their little-endian bytes (the in-memory
// layout on every platform the plugin is built for).
func f32Bytes(v []float32) []byte {
	if len(v) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v))
}
