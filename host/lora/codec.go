package lora

import "github.com/arenahost/arenahost/shared/nf4"

// Codec is the bitsandbytes 4-bit rule of one quant type as shared/lora's
// fused pass wants it.
type Codec struct{ Type nf4.QuantType }

// Dequantize decodes len(dst) values.
func (k Codec) Dequantize(dst []float32, packed []byte, absmax []float32, bs int) {
	nf4.Dequantize(dst, packed, absmax, k.Type.Table(), len(dst), bs)
}

// Quantize encodes src by the bitsandbytes rule.
func (k Codec) Quantize(packed []byte, absmax []float32, src []float32, bs int) {
	nf4.Quantize(packed, absmax, src, bs, k.Type)
}
