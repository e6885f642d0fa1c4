package nf4

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/shared/simd"
)

// withPath runs f with simd path p forced, skipping (logged) when the CPU
// lacks it.
func withPath(t *testing.T, p simd.Path, f func()) {
	t.Helper()
	if !simd.Supported(p) {
		t.Skipf("this CPU lacks %s (best: %s)", p, simd.Best())
	}
	prev, _ := simd.Force(p)
	defer simd.Force(prev)
	f()
}

// hostile draws values that exercise every branch of the rule: ties on the
// thresholds, zeros of both signs, all-zero blocks, NaN, ±Inf, denormals,
// and values a ulp either side of a threshold once scaled.
func hostile(r *rand.Rand, n, bs int) []float32 {
	v := make([]float32, n)
	for i := range v {
		switch r.IntN(20) {
		case 0:
			v[i] = float32(math.NaN())
		case 1:
			v[i] = float32(math.Inf(1 - 2*r.IntN(2)))
		case 2:
			v[i] = float32(math.Copysign(0, -1))
		case 3:
			v[i] = math.Float32frombits(uint32(r.IntN(1 << 23))) // denormal
		case 4:
			// A threshold, exactly (a tie: the lower code) or a ulp
			// either side; blocks with absmax 1 below keep it as it is.
			th := nf4Thresholds[r.IntN(15)]
			switch r.IntN(3) {
			case 0:
				v[i] = th
			case 1:
				v[i] = math.Nextafter32(th, 2)
			default:
				v[i] = math.Nextafter32(th, -2)
			}
		default:
			v[i] = float32(r.NormFloat64())
		}
	}
	// Some blocks all zero, some with absmax exactly 1 so the threshold
	// values above are hit as they are.
	for b := 0; b*bs < n; b++ {
		lo, hi := b*bs, min(b*bs+bs, n)
		switch b % 5 {
		case 1:
			clear(v[lo:hi])
		case 2:
			for i := lo; i < hi; i++ {
				if x := v[i]; x != x || math.IsInf(float64(x), 0) || x > 1 || x < -1 {
					v[i] = 0.5
				}
			}
			v[lo] = 1
		}
	}
	return v
}

// TestVectorCodecMatchesScalar: for every simd path the CPU has, Quantize,
// Dequantize and DequantizeLogical give the generic path's bytes and bits
// on odd lengths, partial last blocks, every blocksize kind (vector-sized
// and not) and hostile values.
func TestVectorCodecMatchesScalar(t *testing.T) {
	r := rand.New(rand.NewPCG(19, 4))
	type tc struct{ n, bs int }
	var cases []tc
	for _, bs := range []int{2, 6, 32, 64, 128, 4096} {
		for _, n := range []int{1, 3, bs - 1, bs, bs + 1, 5*bs + 17, 1 << 17, 1<<17 + 3*bs + 1} {
			if n > 0 {
				cases = append(cases, tc{n, bs})
			}
		}
	}
	for _, p := range []simd.Path{simd.AVX2, simd.AVX512} {
		t.Run(p.String(), func(t *testing.T) {
			for _, c := range cases {
				src := hostile(r, c.n, c.bs)
				nb := Blocks(c.n, c.bs)
				for _, qt := range []QuantType{QuantNF4, QuantFP4} {
					wantP, wantA := make([]byte, PackedLen(c.n)), make([]float32, nb)
					withPath(t, simd.Generic, func() { Quantize(wantP, wantA, src, c.bs, qt) })
					gotP, gotA := make([]byte, PackedLen(c.n)), make([]float32, nb)
					withPath(t, p, func() { Quantize(gotP, gotA, src, c.bs, qt) })
					if !bytes.Equal(gotP, wantP) {
						i := 0
						for gotP[i] == wantP[i] {
							i++
						}
						t.Fatalf("%s n=%d bs=%d: packed byte %d = %#x, scalar %#x (values %g %g)", qt, c.n, c.bs, i, gotP[i], wantP[i], src[2*i], src[min(2*i+1, c.n-1)])
					}
					if i := diffBits(gotA, wantA); i >= 0 {
						t.Fatalf("%s n=%d bs=%d: absmax %d = %g, scalar %g", qt, c.n, c.bs, i, gotA[i], wantA[i])
					}
					for _, dt := range []DType{Float32, BFloat16, Float16} {
						want, got := make([]float32, c.n), make([]float32, c.n)
						withPath(t, simd.Generic, func() {
							Dequantize(want, wantP, wantA, qt.Table(), c.n, c.bs)
							RoundTo(want, dt)
						})
						withPath(t, p, func() { DequantizeLogical(got, wantP, wantA, qt.Table(), c.n, c.bs, dt) })
						if i := diffBits(got, want); i >= 0 {
							t.Fatalf("%s %s n=%d bs=%d: value %d = %g, scalar %g", qt, dt, c.n, c.bs, i, got[i], want[i])
						}
						if dt == Float32 {
							withPath(t, p, func() { Dequantize(got, wantP, wantA, qt.Table(), c.n, c.bs) })
							if i := diffBits(got, want); i >= 0 {
								t.Fatalf("%s Dequantize n=%d bs=%d: value %d = %g, scalar %g", qt, c.n, c.bs, i, got[i], want[i])
							}
						}
					}
				}
			}
		})
	}
}

// TestDequantizeLogicalNaN: a NaN absmax decodes to NaN and, rounded to
// bfloat16, to the bits half.F32ToBF16 gives (0xFFFF), on every path.
func TestDequantizeLogicalNaN(t *testing.T) {
	const n, bs = 128, 64
	packed := make([]byte, n/2)
	for i := range packed {
		packed[i] = byte(i * 37)
	}
	absmax := []float32{float32(math.NaN()), 3e38}
	for _, p := range []simd.Path{simd.Generic, simd.AVX2, simd.AVX512} {
		t.Run(p.String(), func(t *testing.T) {
			got := make([]float32, n)
			withPath(t, p, func() { DequantizeLogical(got, packed, absmax, &NF4, n, bs, BFloat16) })
			for i, v := range got[:bs] {
				if math.Float32bits(v) != 0xffff0000 {
					t.Fatalf("value %d = %#x, want 0xffff0000", i, math.Float32bits(v))
				}
			}
		})
	}
}

func diffBits(a, b []float32) int {
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}
