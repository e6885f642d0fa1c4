//go:build amd64

package nf4

import "github.com/arenahost/arenahost/shared/simd"

// The AVX-512 and AVX2 kernels in codec_amd64.s: nb whole blocks of bs values, bs
// a multiple of 16, bit for bit as the scalar loops.

//go:noescape
func dequantBlocks512(dst *float32, packed *byte, absmax *float32, nb int, bs int, code *[16]float32, bf16 bool)

//go:noescape
func quantBlocks512(packed *byte, absmax *float32, src *float32, nb int, bs int, thr *[16]float32)

//go:noescape
func dequantBlocks256(dst *float32, packed *byte, absmax *float32, nb int, bs int, code *[16]float32, bf16 bool)

//go:noescape
func quantBlocks256(packed *byte, absmax *float32, src *float32, nb int, bs int, thr *[120]float32)

// nf4ThresholdsX8 holds each of the 15 NF4 thresholds 8 times, for the
// AVX2 kernel's 256-bit compares.
var nf4ThresholdsX8 = func() (t [120]float32) {
	for k := range 15 {
		for l := range 8 {
			t[8*k+l] = nf4Thresholds[k]
		}
	}
	return t
}()

// vecBlocks reports whether the vector kernels take whole blocks of bs.
func vecBlocks(bs int) bool { return simd.Current() != simd.Generic && bs%16 == 0 && bs > 0 }

// dequantVec decodes blocks [b0, b1), all whole, into dst (indexed from
// element 0 of the tensor), rounding the table to bfloat16 when bf16.
func dequantVec(dst []float32, packed []byte, absmax []float32, code *[16]float32, b0, b1, bs int, bf16 bool) {
	if b1 <= b0 {
		return
	}
	_ = dst[b1*bs-1]
	_ = packed[b1*bs/2-1]
	_ = absmax[b1-1]
	if simd.Current() == simd.AVX512 {
		dequantBlocks512(&dst[b0*bs], &packed[b0*bs/2], &absmax[b0], b1-b0, bs, code, bf16)
		return
	}
	dequantBlocks256(&dst[b0*bs], &packed[b0*bs/2], &absmax[b0], b1-b0, bs, code, bf16)
}

// quantVecNF4 encodes blocks [b0, b1), all whole, of src.
func quantVecNF4(packed []byte, absmax []float32, src []float32, b0, b1, bs int) {
	if b1 <= b0 {
		return
	}
	_ = src[b1*bs-1]
	_ = packed[b1*bs/2-1]
	_ = absmax[b1-1]
	if simd.Current() == simd.AVX512 {
		quantBlocks512(&packed[b0*bs/2], &absmax[b0], &src[b0*bs], b1-b0, bs, &nf4Thresholds)
		return
	}
	quantBlocks256(&packed[b0*bs/2], &absmax[b0], &src[b0*bs], b1-b0, bs, &nf4ThresholdsX8)
}
