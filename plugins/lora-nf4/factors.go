package main

import (
	"context"
	"fmt"
	"unsafe"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// factors is one layer's bound side factors A' [R' × In] and B' [Out × R']
// in the regions the host allocated, F32 or BF16 (each value rounded once
// from the float32 factor, lorawire.FactorBF16): mapped in place on a CPU
// segment, or device addresses on a CUDA slab (written by Upload from a
// CPU copy).
type factors struct {
	name       [2]string // the descriptors' names, for errors
	bf16       bool
	es         int       // element size: 4 (F32) or 2 (BF16)
	a, b       []byte    // CPU views
	a32, b32   []float32 // CPU views of F32 factors, written in place
	dev        device    // set when both are on the device
	aPtr, bPtr gpu.DevicePtr
}

// factorView opens a layer's A' and B' descriptors, CPU or device; both
// must be on the same kind of memory and of the same dtype, F32 or BF16.
func (e *engine) factorView(c *sdk.Call, w string, a, b *pluginv1.TensorDescriptor) (*factors, error) {
	f := &factors{name: [2]string{a.GetName(), b.GetName()}}
	for _, d := range []*pluginv1.TensorDescriptor{a, b} {
		if dt := d.GetDtype(); dt != pluginv1.DType_DTYPE_F32 && dt != pluginv1.DType_DTYPE_BF16 || dt != a.GetDtype() {
			return nil, fmt.Errorf("layer %s: tensor %q: dtype %v, want F32 or BF16, both factors alike: %w", w, d.GetName(), dt, sdk.ErrInvalidArgument)
		}
	}
	f.bf16 = a.GetDtype() == pluginv1.DType_DTYPE_BF16
	f.es, _ = tensor.ElemSize(a.GetDtype()) // F32 or BF16: known
	if ca, cb := isCUDA(a.GetRegion()), isCUDA(b.GetRegion()); ca != cb {
		return nil, fmt.Errorf("layer %s: factors %s and %s are on different memories (one CPU, one CUDA): %w", w, a.GetName(), b.GetName(), sdk.ErrInvalidArgument)
	} else if !ca {
		var err error
		if f.a, err = c.Bytes(a); err != nil {
			return nil, err
		}
		if f.b, err = c.Bytes(b); err != nil {
			return nil, err
		}
		if !f.bf16 {
			if f.a32, err = c.Float32s(a); err != nil {
				return nil, err
			}
			if f.b32, err = c.Float32s(b); err != nil {
				return nil, err
			}
		}
		return f, nil
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

// put writes v at element offset off of A' (k 0) or B' (k 1): into the
// mapping, or uploaded, converted to the factors' dtype.
func (f *factors) put(ctx context.Context, k int, v []float32, off int) error {
	n := f.es * len(v)
	if f.dev == nil {
		dst := f.a
		if k == 1 {
			dst = f.b
		}
		if off < 0 || f.es*off+n > len(dst) {
			return fmt.Errorf("tensor %s: %d values at %d do not fit its %d bytes: %w", f.name[k], len(v), off, len(dst), sdk.ErrInvalidArgument)
		}
		f.encode(dst[f.es*off:f.es*off+n], v)
		return nil
	}
	base := f.aPtr
	if k == 1 {
		base = f.bPtr
	}
	src := f32Bytes(v)
	if f.bf16 {
		src = make([]byte, n)
		f.encode(src, v)
	}
	if err := f.dev.Upload(ctx, base+gpu.DevicePtr(f.es*off), src); err != nil {
		return fmt.Errorf("tensor %s: upload %d bytes at %d: %w", f.name[k], n, f.es*off, err)
	}
	return nil
}

func (f *factors) encode(dst []byte, v []float32) {
	if f.bf16 {
		half.EncodeBF16(dst, v)
	} else {
		half.EncodeF32(dst, v)
	}
}

// writeAll writes the whole of A' and B' from the layer's side state.
func (f *factors) writeAll(ctx context.Context, sl *lora.SideLayer) error {
	rr := boundRank(sl)
	if f.a32 != nil {
		writeA(f.a32, sl)
		writeBCols(f.b32, sl, 0, rr)
		return nil
	}
	// A' is A_cat's rows then the dense rows, each contiguous in the side
	// state: put straight from there (an f32 upload copies nothing more).
	// B' interleaves B_cat with identity columns: built first.
	if sl.Rank > 0 {
		if err := f.put(ctx, 0, sl.A[:sl.Rank*sl.In], 0); err != nil {
			return err
		}
	}
	if sl.Dense != nil {
		if err := f.put(ctx, 0, sl.Dense, sl.Rank*sl.In); err != nil {
			return err
		}
	}
	b := make([]float32, sl.Out*rr)
	writeBCols(b, sl, 0, rr)
	return f.put(ctx, 1, b, 0)
}

// rewrite publishes what a strength change touched: B's changed columns
// (in place in a CPU F32 mapping; otherwise all of B', which is small and
// on the device strided) and the dense rows of A'.
func (f *factors) rewrite(ctx context.Context, sl *lora.SideLayer, tc lora.Touched) error {
	rr := boundRank(sl)
	if f.a32 != nil {
		if tc.Cols > 0 {
			writeBCols(f.b32, sl, tc.Col, tc.Col+tc.Cols)
		}
		if tc.Dense && sl.Dense != nil {
			copy(f.a32[sl.Rank*sl.In:], sl.Dense)
		}
		return nil
	}
	if tc.Cols > 0 {
		b := make([]float32, sl.Out*rr)
		writeBCols(b, sl, 0, rr)
		if err := f.put(ctx, 1, b, 0); err != nil {
			return err
		}
	}
	if tc.Dense && sl.Dense != nil {
		return f.put(ctx, 0, sl.Dense, sl.Rank*sl.In)
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
