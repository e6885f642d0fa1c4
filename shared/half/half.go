// Package half owns the 16-bit float formats the project stores: bfloat16
// and IEEE binary16 (float16), and the 8-bit F8_E4M3/F8_E5M2 (fp8.go),
// converted to and from float32 exactly the way
// torch converts them on the CPU, plus bulk helpers over little-endian byte
// slices (the layout of safetensors data and of arena regions).
//
// Rules (checked against torch 2.x on every 16-bit pattern and on random and
// special float32 values, see half_test.go):
//
//   - bf16/f16 → f32 is exact (every 16-bit value is a float32), denormals
//     included.
//   - f32 → bf16 and f32 → f16 round to nearest, ties to even. Values too
//     large for the format become ±Inf; f16 produces denormals and signed
//     zeros below its normal range; nothing is flushed to zero.
//   - NaN follows torch's tensor (vectorised, AVX2) path bit for bit, which
//     is what `tensor.to(dtype)` produces on x86-64: f32 NaN → bf16 0xFFFF;
//     f32 NaN → f16 keeps the sign and the top 10 payload bits and sets the
//     quiet bit (sign|0x7E00|payload>>13, F16C's rule); f16 NaN → f32
//     keeps sign and payload and sets the quiet bit; bf16 NaN → f32 keeps
//     its bits. (Torch's scalar paths, used for tensors of a few elements,
//     differ: f32 → bf16 NaN gives 0x7FC0, f16 → f32 NaN 0x7FFFFFFF.)
//
// Nothing here uses FMA or platform intrinsics; results are identical on
// every GOARCH.
package half

import (
	"encoding/binary"
	"math"
	"sync"
)

// BF16ToF32 widens a bfloat16 bit pattern to float32 (exact).
func BF16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F32ToBF16 rounds a float32 to bfloat16, to nearest with ties to even.
// NaN becomes 0xFFFF, as in torch's vectorised conversion.
func F32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN
		return 0xffff
	}
	// Round to nearest even: add 0x7FFF plus the lowest kept bit. Overflow
	// of the largest finite values carries into the exponent and yields Inf,
	// as it must.
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// F16ToF32 widens an IEEE binary16 bit pattern to float32 (exact, denormals
// included). NaN keeps its sign and payload and gets the quiet bit, as in
// torch's vectorised (F16C) conversion.
func F16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f && man != 0: // NaN: F16C's rule, quiet bit set.
		return math.Float32frombits(sign | 0x7fc00000 | man<<13)
	case exp == 0x1f: // ±Inf
		return math.Float32frombits(sign | 0x7f800000)
	case exp != 0: // normal
		return math.Float32frombits(sign | (exp+112)<<23 | man<<13)
	case man == 0: // signed zero
		return math.Float32frombits(sign)
	}
	// Denormal: value = man * 2^-24, renormalise into a float32 normal.
	e := uint32(113) // biased float32 exponent of 2^-14
	for man&0x400 == 0 {
		man <<= 1
		e--
	}
	return math.Float32frombits(sign | e<<23 | (man&0x3ff)<<13)
}

// F32ToF16 rounds a float32 to IEEE binary16, to nearest with ties to even,
// producing denormals below 2^-14 and ±Inf above 65504 (after rounding).
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	abs := b & 0x7fffffff
	switch {
	case abs > 0x7f800000: // NaN: keep top payload bits, set quiet bit.
		return sign | 0x7e00 | uint16(abs>>13)&0x3ff
	case abs >= 0x477ff000: // ≥ 65520 rounds to Inf (65504 + half ulp).
		return sign | 0x7c00
	case abs >= 0x38800000: // ≥ 2^-14: normal result.
		// Rebias the exponent (127 → 15) and round the 13 dropped bits.
		v := abs - 0x38000000
		v += 0x0fff + (v>>13)&1
		return sign | uint16(v>>13)
	case abs < 0x33000000: // < 2^-25: rounds to zero (2^-25 itself is a tie to 0).
		return sign
	}
	// Denormal result: value / 2^-24, rounded to an integer, ties to even.
	e := abs >> 23              // 102..112
	man := abs&0x7fffff | 1<<23 // 24-bit significand
	shift := 126 - e            // value = man * 2^(e-150); /2^-24 → man >> (126-e)
	q := man >> shift
	rem := man & (1<<shift - 1)
	halfway := uint32(1) << (shift - 1)
	if rem > halfway || (rem == halfway && q&1 == 1) {
		q++
	}
	return sign | uint16(q)
}

// DecodeBF16 widens little-endian bfloat16 values from src into dst and
// returns how many it converted: min(len(dst), len(src)/2).
func DecodeBF16(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/2)
	src = src[:2*n]
	for i := range dst[:n] {
		dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(src[2*i:])) << 16)
	}
	return n
}

// EncodeBF16 rounds src to bfloat16 (see F32ToBF16) and writes the values
// little-endian into dst. It returns how many it converted:
// min(len(src), len(dst)/2).
func EncodeBF16(dst []byte, src []float32) int {
	n := min(len(src), len(dst)/2)
	dst = dst[:2*n]
	for i, f := range src[:n] {
		binary.LittleEndian.PutUint16(dst[2*i:], F32ToBF16(f))
	}
	return n
}

// DecodeF16 widens little-endian float16 values from src into dst and
// returns how many it converted: min(len(dst), len(src)/2).
func DecodeF16(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/2)
	src = src[:2*n]
	if n < 4096 {
		for i := range dst[:n] {
			dst[i] = F16ToF32(binary.LittleEndian.Uint16(src[2*i:]))
		}
		return n
	}
	t := f16Table()
	for i := range dst[:n] {
		dst[i] = t[binary.LittleEndian.Uint16(src[2*i:])]
	}
	return n
}

var (
	f16Once sync.Once
	f16Tab  *[1 << 16]float32
)

// f16Table returns F16ToF32 for every pattern (256 KiB), built on first use
// by a large DecodeF16.
func f16Table() *[1 << 16]float32 {
	f16Once.Do(func() {
		t := new([1 << 16]float32)
		for h := range t {
			t[h] = F16ToF32(uint16(h))
		}
		f16Tab = t
	})
	return f16Tab
}

// EncodeF16 rounds src to float16 (see F32ToF16) and writes the values
// little-endian into dst. It returns how many it converted:
// min(len(src), len(dst)/2).
func EncodeF16(dst []byte, src []float32) int {
	n := min(len(src), len(dst)/2)
	dst = dst[:2*n]
	for i, f := range src[:n] {
		binary.LittleEndian.PutUint16(dst[2*i:], F32ToF16(f))
	}
	return n
}

// DecodeF32 reads little-endian float32 values from src into dst and returns
// how many it read: min(len(dst), len(src)/4).
func DecodeF32(dst []float32, src []byte) int {
	n := min(len(dst), len(src)/4)
	src = src[:4*n]
	for i := range dst[:n] {
		dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
	}
	return n
}

// EncodeF32 writes src little-endian into dst and returns how many values it
// wrote: min(len(src), len(dst)/4).
func EncodeF32(dst []byte, src []float32) int {
	n := min(len(src), len(dst)/4)
	dst = dst[:4*n]
	for i, f := range src[:n] {
		binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(f))
	}
	return n
}
