package lora

import (
	"fmt"

	"github.com/arenahost/arenahost/shared/nf4"
)

// NF4Codec is the bitsandbytes rule from shared/nf4 as the fused pass's
// Codec. DType is the weight's logical dtype from its quant state:
// bitsandbytes dequantizes into it (one rounding of the fp32 product), and
// PEFT's merge adds the fp32 delta to that, so the pass does the same.
type NF4Codec struct {
	Type  nf4.QuantType // nf4.QuantNF4 or nf4.QuantFP4
	DType nf4.DType     // bfloat16, float16 or float32
}

// NewNF4Codec checks the quant type and dtype.
func NewNF4Codec(qt nf4.QuantType, dt nf4.DType) (NF4Codec, error) {
	if qt != nf4.QuantNF4 && qt != nf4.QuantFP4 {
		return NF4Codec{}, fmt.Errorf("nf4 codec: quant type %q", qt)
	}
	switch dt {
	case nf4.BFloat16, nf4.Float16, nf4.Float32:
	default:
		return NF4Codec{}, fmt.Errorf("nf4 codec: dtype %q", dt)
	}
	return NF4Codec{Type: qt, DType: dt}, nil
}

// Dequantize decodes a tile and rounds it to the logical dtype.
func (c NF4Codec) Dequantize(dst []float32, packed []byte, absmax []float32, blocksize int) {
	nf4.DequantizeLogical(dst, packed, absmax, c.Type.Table(), len(dst), blocksize, c.DType)
}

// Quantize encodes a tile by the CUDA kernel's rule.
func (c NF4Codec) Quantize(packed []byte, absmax []float32, src []float32, blocksize int) {
	nf4.Quantize(packed, absmax, src, blocksize, c.Type)
}
