package simd

import "math"

// FMA32 returns a·b + c rounded once to float32 (round to nearest even),
// as a float32 fused multiply-add instruction does (x86 VFMADD…PS, CUDA
// __fmaf_rn / fma.rn.f32, C fmaf): the scalar form of the LoRA delta
// product's order, which the vector kernels and the CUDA kernel reproduce
// with their FMA instructions.
//
// The product of two float32 is exact in float64 (24+24 < 53 bits), but
// rounding a·b + c to float64 and then to float32 can round twice and miss
// by one ulp. So the float64 sum s is rounded to odd instead: the exact
// error e of the sum (TwoSum, exact for these magnitudes: nothing here
// overflows or leaves float64's normal range, as |a·b| ≤ 2^256 and every
// nonzero |a·b| ≥ 2^-298) tells whether s is inexact, and an inexact s
// with an even last bit moves one ulp towards e, to the odd neighbour of
// the two that bracket the exact value. Rounding to odd with 53 bits then
// to nearest with 24 (or fewer: float32 subnormals) is a single correct
// rounding. Only a sum that lands on a float32 midpoint can round twice
// wrongly (a midpoint strictly between the exact value and s would be
// nearer than s), so the check runs for those alone. NaN, infinities and signed zeros follow IEEE 754 as float64
// arithmetic gives them (a NaN's payload is not specified).
func FMA32(a, b, c float32) float32 {
	p, z := float64(float64(a)*float64(b)), float64(c) // the product is exact; the conversion forbids fusing it with the add
	s := p + z
	// Rounding s to float32 rounds twice wrongly only when s is a float32
	// midpoint, whose low 28 bits are zero (29 in the normal range, more
	// below it); everything else is already right.
	if u := math.Float64bits(s); u&(1<<28-1) == 0 {
		// TwoSum: s + e == p + z exactly.
		bv := s - p
		e := (p - (s - bv)) + (z - bv)
		// Inexact and finite (e is NaN when s is Inf or NaN), and s's
		// last bit is even: to the odd neighbour on e's side, one up in
		// magnitude when e has s's sign, one down otherwise.
		if e != 0 && e == e {
			s = math.Float64frombits(u + 1 - (math.Float64bits(e)^u)>>63<<1)
		}
	}
	return float32(s)
}
