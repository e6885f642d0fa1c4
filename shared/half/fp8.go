package half

import (
	"math"
	"math/bits"
)

// The 8-bit float formats safetensors stores as F8_E4M3 (torch's
// float8_e4m3fn: bias 7, no infinities, 0x7F/0xFF the only NaNs, largest
// finite 448) and F8_E5M2 (torch's float8_e5m2: IEEE-like, bias 15, ±Inf,
// largest finite 57344), converted exactly as torch's c10::Float8_e4m3fn
// and c10::Float8_e5m2 do on the CPU (checked on every pattern and on
// random, tie and boundary float32 values, see fp8_test.go):
//
//   - f8 → f32 is exact; an E4M3 NaN becomes sign|0x7FF00000, an E5M2
//     value is widened through float16.
//   - f32 → f8 rounds to nearest, ties to even, with denormals. E4M3 has
//     no infinity and saturates, as torch 2.15 does: a magnitude that
//     rounds past 448, ±Inf included, becomes ±448 (0x7E with the input's
//     sign); NaN becomes 0x7F with the input's sign. E5M2: a magnitude
//     that rounds past 57344 and ±Inf become ±Inf (0x7C), NaN becomes 0x7F
//     with the input's sign.

// F8E4M3ToF32 widens a float8_e4m3fn bit pattern to float32 (exact).
func F8E4M3ToF32(b uint8) float32 {
	w := uint32(b) << 24
	sign := w & 0x80000000
	nonsign := w & 0x7fffffff
	shift := uint32(bits.LeadingZeros32(nonsign))
	if shift > 4 {
		shift -= 4
	} else {
		shift = 0
	}
	infNaN := uint32(int32(nonsign+0x01000000)>>8) & 0x7f800000
	zero := uint32(int32(nonsign-1) >> 31)
	return math.Float32frombits(sign | (((nonsign<<shift>>4)+((0x78-shift)<<23))|infNaN)&^zero)
}

// F32ToF8E4M3 rounds a float32 to float8_e4m3fn (see above).
func F32ToF8E4M3(f float32) uint8 {
	const (
		fp8Max     = uint32(1087) << 20 // 480.0f: the first magnitude not representable
		denormMask = uint32(141) << 23  // ((127 - 7) + (23 - 3) + 1) << 23
	)
	fb := math.Float32bits(f)
	sign := fb & 0x80000000
	fb ^= sign
	var r uint8
	switch {
	case fb > 0x7f800000: // NaN
		r = 0x7f
	case fb >= fp8Max: // rounds past 448, ±Inf included: saturate
		r = 0x7e
	case fb < uint32(121)<<23: // below 2^-6, the smallest normal: denormal result
		fb = math.Float32bits(math.Float32frombits(fb) + math.Float32frombits(denormMask))
		r = uint8(fb - denormMask)
	default:
		odd := (fb >> 20) & 1
		fb -= (127 - 7) << 23 // rebias the exponent
		fb += 0x7ffff
		fb += odd
		r = min(uint8(fb>>20), 0x7e) // (464, 480) rounds to 480: saturate
	}
	return r | uint8(sign>>24)
}

// F8E5M2ToF32 widens a float8_e5m2 bit pattern to float32 (exact): the
// pattern is the top byte of a float16.
func F8E5M2ToF32(b uint8) float32 { return F16ToF32(uint16(b) << 8) }

// F32ToF8E5M2 rounds a float32 to float8_e5m2 (see above).
func F32ToF8E5M2(f float32) uint8 {
	const (
		fp32Inf    = uint32(255) << 23
		fp8Max     = uint32(143) << 23 // 65536.0f
		denormMask = uint32(134) << 23 // ((127 - 15) + (23 - 2) + 1) << 23
	)
	fb := math.Float32bits(f)
	sign := fb & 0x80000000
	fb ^= sign
	var r uint8
	switch {
	case fb >= fp8Max:
		r = 0x7c
		if fb > fp32Inf {
			r = 0x7f
		}
	case fb < uint32(113)<<23: // below 2^-14: denormal result
		fb = math.Float32bits(math.Float32frombits(fb) + math.Float32frombits(denormMask))
		r = uint8(fb - denormMask)
	default:
		odd := (fb >> 21) & 1
		fb -= (127 - 15) << 23
		fb += 0xfffff
		fb += odd
		r = uint8(fb >> 21)
	}
	return r | uint8(sign>>24)
}

// DecodeF8E4M3 widens float8_e4m3fn values from src into dst and returns
// how many it converted: min(len(dst), len(src)).
func DecodeF8E4M3(dst []float32, src []byte) int {
	n := min(len(dst), len(src))
	for i, b := range src[:n] {
		dst[i] = F8E4M3ToF32(b)
	}
	return n
}

// EncodeF8E4M3 rounds src to float8_e4m3fn into dst and returns how many
// it converted: min(len(src), len(dst)).
func EncodeF8E4M3(dst []byte, src []float32) int {
	n := min(len(src), len(dst))
	for i, f := range src[:n] {
		dst[i] = F32ToF8E4M3(f)
	}
	return n
}

// DecodeF8E5M2 widens float8_e5m2 values from src into dst and returns how
// many it converted: min(len(dst), len(src)).
func DecodeF8E5M2(dst []float32, src []byte) int {
	n := min(len(dst), len(src))
	for i, b := range src[:n] {
		dst[i] = F8E5M2ToF32(b)
	}
	return n
}

// EncodeF8E5M2 rounds src to float8_e5m2 into dst and returns how many it
// converted: min(len(src), len(dst)).
func EncodeF8E5M2(dst []byte, src []float32) int {
	n := min(len(src), len(dst))
	for i, f := range src[:n] {
		dst[i] = F32ToF8E5M2(f)
	}
	return n
}
