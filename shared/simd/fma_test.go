package simd

import (
	"math"
	"math/big"
	"math/rand/v2"
	"testing"
)

// bigFMA is a·b + c rounded once, through 1024-bit arithmetic (exact for
// any finite float32 operands), for finite inputs.
func bigFMA(a, b, c float32) float32 {
	x := new(big.Float).SetPrec(1024).SetFloat64(float64(a))
	x.Mul(x, new(big.Float).SetPrec(1024).SetFloat64(float64(b)))
	x.Add(x, new(big.Float).SetPrec(1024).SetFloat64(float64(c)))
	f, _ := x.Float32()
	if f == 0 && x.Signbit() {
		return float32(math.Copysign(0, -1))
	}
	return f
}

func finite(v float32) bool { return !math.IsNaN(float64(v)) && !math.IsInf(float64(v), 0) }

func sameBits(x, y float32) bool {
	if x != x || y != y {
		return x != x && y != y // NaN payloads are not specified
	}
	return math.Float32bits(x) == math.Float32bits(y)
}

// fmaCases are operand triples (a, b, c) that make a float32 FMA hard:
// uniformly random bit patterns (NaN, infinities, subnormals, zeros),
// ordinary values, near-total cancellation, exact midpoints and values a
// hair beside them (where rounding through float64 rounds twice),
// subnormal results, overflow and signed zeros.
func fmaCases(r *rand.Rand, n int) (as, bs, cs []float32) {
	add := func(a, b, c float32) { as, bs, cs = append(as, a), append(bs, b), append(cs, c) }
	f := math.Float32frombits
	norm := func() float32 { return float32(r.NormFloat64() * math.Pow(2, float64(r.IntN(40)-20))) }
	for range n {
		add(f(r.Uint32()), f(r.Uint32()), f(r.Uint32()))
		a, b := norm(), norm()
		add(a, b, norm())
		// cancellation: c ≈ −a·b
		add(a, b, -float32(float64(a)*float64(b)))
		add(a, b, -float32(float64(a)*float64(b))*(1+float32(r.IntN(5)-2)*0x1p-23))
		// Midpoints: a·b ≈ half an ulp of c, nudged by k·2^-23 and j·2^-23
		// of a and b so the exact sum sits on or a tiny bit off the midpoint.
		c := f(r.Uint32()&0x807fffff | uint32(1+r.IntN(250))<<23)
		_, e := math.Frexp(float64(c))
		half := float32(math.Ldexp(1, e-25)) // half an ulp of c (c in [2^(e-1), 2^e))
		k, j := float32(r.IntN(9)-4), float32(r.IntN(9)-4)
		sa, sb := float32(1-2*r.IntN(2)), float32(1-2*r.IntN(2))
		add(sa*half*(1+k*0x1p-23), sb*(1+j*0x1p-23), c)
		add(sa*half*(1+k*0x1p-23)*float32(1+r.IntN(3)), sb*(1-j*0x1p-23), c)
		// Subnormal results and operands.
		add(f(r.Uint32()&0x807fffff), f(r.Uint32()&0x3fffffff|0x3f000000), f(r.Uint32()&0x807fffff))
		add(f(r.Uint32()&0x80ffffff|0x0c000000), f(r.Uint32()&0x80ffffff|0x32000000), f(r.Uint32()&0x807fffff))
		// Overflow and its edge.
		add(f(r.Uint32()&0x80ffffff|0x5f000000), f(r.Uint32()&0x80ffffff|0x5f000000), f(r.Uint32()&0x80ffffff|0x7f000000))
		add(math.MaxFloat32, 1+float32(r.IntN(3))*0x1p-24, -f(r.Uint32()&0x007fffff|0x73000000))
	}
	z, nz := float32(0), float32(math.Copysign(0, -1))
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	specials := []float32{z, nz, 1, -1, inf, -inf, nan, math.SmallestNonzeroFloat32, -math.SmallestNonzeroFloat32, math.MaxFloat32, -math.MaxFloat32, 0x1p-126, 3}
	for _, a := range specials {
		for _, b := range specials {
			for _, c := range specials {
				add(a, b, c)
			}
		}
	}
	for len(as)%8 != 0 {
		add(1, 2, 3)
	}
	return as, bs, cs
}

// TestFMA32: FMA32 (and AxpyFMA32) equals one correct rounding (1024-bit arithmetic) on
// finite operands and the CPU's VFMADD231PS on every operand, NaN,
// infinities, subnormals and signed zeros included.
func TestFMA32(t *testing.T) {
	r := rand.New(rand.NewPCG(32, 32))
	as, bs, cs := fmaCases(r, 40000)
	var hw []float32
	if hasFMA {
		hw = append([]float32(nil), cs...)
		fmaVec(&hw[0], &as[0], &bs[0], len(hw))
	} else {
		t.Log("this CPU has no FMA instruction: checking against 1024-bit arithmetic only")
	}
	naive, fails := 0, 0
	for i := range as {
		a, b, c := as[i], bs[i], cs[i]
		got := FMA32(a, b, c)
		if hw != nil && !sameBits(got, hw[i]) {
			fails++
			if fails < 10 {
				t.Errorf("FMA32(%x, %x, %x) = %x, VFMADD231PS %x", math.Float32bits(a), math.Float32bits(b), math.Float32bits(c), math.Float32bits(got), math.Float32bits(hw[i]))
			}
		}
		if finite(a) && finite(b) && finite(c) {
			want := bigFMA(a, b, c)
			if !sameBits(got, want) {
				fails++
				if fails < 10 {
					t.Errorf("FMA32(%g, %g, %g) = %x, exact %x", a, b, c, math.Float32bits(got), math.Float32bits(want))
				}
			}
			if !sameBits(float32(float64(a)*float64(b)+float64(c)), want) {
				naive++
			}
		}
	}
	// AxpyFMA32, FMA32 over a row, on each triple and on whole rows.
	for i := range as {
		y := []float32{cs[i]}
		AxpyFMA32(y, bs[i:i+1], as[i])
		if want := FMA32(as[i], bs[i], cs[i]); !sameBits(y[0], want) {
			fails++
			if fails < 10 {
				t.Errorf("AxpyFMA32 on (%x, %x, %x) = %x, FMA32 %x", math.Float32bits(as[i]), math.Float32bits(bs[i]), math.Float32bits(cs[i]), math.Float32bits(y[0]), math.Float32bits(want))
			}
		}
	}
	for _, a := range as[:40] {
		y := append([]float32(nil), cs...)
		AxpyFMA32(y, bs, a)
		for i := range y {
			if want := FMA32(a, bs[i], cs[i]); !sameBits(y[i], want) {
				t.Fatalf("AxpyFMA32 with a=%x: y[%d] = %x, FMA32 %x", math.Float32bits(a), i, math.Float32bits(y[i]), math.Float32bits(want))
			}
		}
	}
	if fails > 0 {
		t.Fatalf("%d of %d triples differ", fails, len(as))
	}
	// The cases must include ones where rounding through float64 fails,
	// or they would not test the correction.
	if naive == 0 {
		t.Fatal("no case where float32(float64 a·b + c) rounds twice: the midpoint cases test nothing")
	}
	t.Logf("%d triples agree; float32(float64(a·b)+c) would get %d of them wrong", len(as), naive)
}
