package sdk

import (
	"encoding/binary"
	"fmt"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// logicalDTypes maps a QuantInfo's logical dtype to shared/nf4's.
var logicalDTypes = map[pluginv1.DType]nf4.DType{
	pluginv1.DType_DTYPE_F32:  nf4.Float32,
	pluginv1.DType_DTYPE_F16:  nf4.Float16,
	pluginv1.DType_DTYPE_BF16: nf4.BFloat16,
}

// DequantizeNF4 decodes a bitsandbytes 4-bit (NF4 or FP4) weight
// descriptor, reading its packed codes and quant tensors zero-copy through
// the call's mapper. The values are those of the weight's logical dtype
// (quant.dtype: bf16, f16 or f32) widened exactly to float32: what a bf16
// matmul would see, bit-exact with bitsandbytes' dequantize_4bit. The
// logical shape is d.Quant.Shape (the descriptor's own shape is the packed
// one). It is the Go twin of the Python SDK's dequantize_nf4(desc,
// dtype=np.float32).
func (c *Call) DequantizeNF4(d *pluginv1.TensorDescriptor) ([]float32, error) {
	return DequantizeNF4(c.p.mapper, d)
}

// DequantizeNF4Bytes is DequantizeNF4 in the logical dtype itself
// (little-endian bytes of d.Quant.Dtype), like the Python SDK's
// dequantize_nf4(desc).
func (c *Call) DequantizeNF4Bytes(d *pluginv1.TensorDescriptor) ([]byte, error) {
	return DequantizeNF4Bytes(c.p.mapper, d)
}

// DequantizeNF4 is Call.DequantizeNF4 with an explicit mapper, for tools
// and tests that map descriptors themselves.
func DequantizeNF4(m *tensor.Mapper, d *pluginv1.TensorDescriptor) ([]float32, error) {
	b, st, err := dequantizeNF4(m, d)
	if err != nil {
		return nil, err
	}
	n := int(st.Numel())
	out := make([]float32, n)
	switch st.DType {
	case nf4.Float32:
		v, err := tensor.Float32s(b)
		if err != nil {
			return nil, fmt.Errorf("tensor %q: %w", d.GetName(), err)
		}
		copy(out, v)
	case nf4.BFloat16, nf4.Float16:
		if err := widen(out, b, st.DType); err != nil {
			return nil, fmt.Errorf("tensor %q: %w", d.GetName(), err)
		}
	}
	return out, nil
}

// DequantizeNF4Bytes is Call.DequantizeNF4Bytes with an explicit mapper.
func DequantizeNF4Bytes(m *tensor.Mapper, d *pluginv1.TensorDescriptor) ([]byte, error) {
	b, _, err := dequantizeNF4(m, d)
	return b, err
}

func dequantizeNF4(m *tensor.Mapper, d *pluginv1.TensorDescriptor) ([]byte, nf4.QuantState, error) {
	name := d.GetName()
	q := d.GetQuant()
	if q == nil {
		return nil, nf4.QuantState{}, fmt.Errorf("tensor %q: not quantized (no quant info): %w", name, ErrInvalidArgument)
	}
	st := nf4.QuantState{QuantType: nf4.QuantType(q.GetQuantType()), Blocksize: int(q.GetBlocksize()), Shape: q.GetShape(),
		Nested: q.GetNested(), NestedBlocksize: int(q.GetNestedBlocksize()), NestedDType: nf4.Float32, NestedOffset: q.GetNestedOffset()}
	var ok bool
	if st.DType, ok = logicalDTypes[q.GetDtype()]; !ok {
		return nil, st, fmt.Errorf("tensor %q: quant.dtype %v is not F32, F16 or BF16: %w", name, q.GetDtype(), ErrInvalidArgument)
	}
	if st.QuantType.Table() == nil {
		return nil, st, fmt.Errorf("tensor %q: quant.quant_type %q is not nf4 or fp4: %w", name, q.GetQuantType(), ErrInvalidArgument)
	}
	if len(st.Shape) == 0 || st.Numel() <= 0 {
		return nil, st, fmt.Errorf("tensor %q: quant.shape %v is empty: %w", name, st.Shape, ErrInvalidArgument)
	}
	if st.Blocksize <= 0 {
		return nil, st, fmt.Errorf("tensor %q: quant.blocksize %d must be positive: %w", name, st.Blocksize, ErrInvalidArgument)
	}
	if st.Nested && st.NestedBlocksize == 0 {
		st.NestedBlocksize = nf4.NestedBlocksize
	}
	n := int(st.Numel())
	packed, err := m.Region(d.GetRegion(), uint64(nf4.PackedLen(n)), false)
	if err != nil {
		return nil, st, fmt.Errorf("tensor %q: packed codes of shape %v: %w", name, st.Shape, err)
	}
	ref := func(what string, r *pluginv1.TensorRef, want pluginv1.DType) ([]byte, error) {
		if r == nil {
			return nil, fmt.Errorf("tensor %q: quant.%s missing: %w", name, what, ErrInvalidArgument)
		}
		if r.GetDtype() != want {
			return nil, fmt.Errorf("tensor %q: quant.%s dtype %v, want %v: %w", name, what, r.GetDtype(), want, ErrInvalidArgument)
		}
		nb, err := tensor.NBytes(r.GetDtype(), r.GetShape())
		if err != nil {
			return nil, fmt.Errorf("tensor %q: quant.%s: %w", name, what, err)
		}
		b, err := m.Region(r.GetRegion(), nb, false)
		if err != nil {
			return nil, fmt.Errorf("tensor %q: quant.%s: %w", name, what, err)
		}
		return b, nil
	}
	wd := nf4.WeightData{Packed: packed}
	if wd.QuantMap, err = ref("quant_map", q.GetQuantMap(), pluginv1.DType_DTYPE_F32); err != nil {
		return nil, st, err
	}
	if st.Nested {
		if wd.Absmax, err = ref("absmax", q.GetAbsmax(), pluginv1.DType_DTYPE_U8); err != nil {
			return nil, st, err
		}
		if wd.NestedAbsmax, err = ref("nested_absmax", q.GetNestedAbsmax(), pluginv1.DType_DTYPE_F32); err != nil {
			return nil, st, err
		}
		if wd.NestedQuantMap, err = ref("nested_quant_map", q.GetNestedQuantMap(), pluginv1.DType_DTYPE_F32); err != nil {
			return nil, st, err
		}
	} else if wd.Absmax, err = ref("absmax", q.GetAbsmax(), pluginv1.DType_DTYPE_F32); err != nil {
		return nil, st, err
	}
	code, err := tensor.Float32s(wd.QuantMap)
	if err != nil || len(code) != 16 {
		return nil, st, fmt.Errorf("tensor %q: quant.quant_map: %d values, want 16 (%v): %w", name, len(code), err, ErrInvalidArgument)
	}
	absmax, err := nf4.Absmax(st, wd)
	if err != nil {
		return nil, st, fmt.Errorf("tensor %q: %w: %w", name, err, ErrInvalidArgument)
	}
	if need := nf4.Blocks(n, st.Blocksize); len(absmax) < need {
		return nil, st, fmt.Errorf("tensor %q: absmax has %d values, %d elements at blocksize %d need %d: %w", name, len(absmax), n, st.Blocksize, need, ErrInvalidArgument)
	}
	out := make([]byte, n*st.DType.Size())
	// The stored quant_map, as bitsandbytes' kernels use it (it is the
	// NF4/FP4 table for every weight bitsandbytes writes).
	nf4.DequantizeTo(out, st.DType, packed, absmax, (*[16]float32)(code), n, st.Blocksize)
	return out, st, nil
}

// widen converts little-endian bf16 or f16 values to float32, exactly.
func widen(dst []float32, b []byte, dt nf4.DType) error {
	if len(b) != 2*len(dst) {
		return fmt.Errorf("%d bytes for %d values", len(b), len(dst))
	}
	for i := range dst {
		h := binary.LittleEndian.Uint16(b[2*i:])
		if dt == nf4.BFloat16 {
			dst[i] = half.BF16ToF32(h)
		} else {
			dst[i] = half.F16ToF32(h)
		}
	}
	return nil
}
