package render

import (
	"math"
	"math/rand/v2"
	"testing"
)

func randFloats(r *rand.Rand, n int) []float32 {
	d := make([]float32, n)
	for i := range d {
		d[i] = float32(r.NormFloat64())
	}
	return d
}

// The micro-kernel (assembly where the CPU has AVX2+FMA) against a float64
// sum, with scattered tap offsets.
func TestGemm(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	for _, k := range []int{1, 2, 7, 36, 576} {
		a, b := randFloats(r, tileRows*k), randFloats(r, 16*k+40)
		off := make([]int32, k)
		for i := range off {
			off[i] = int32(16*i + r.IntN(40))
		}
		var got, port [tileRows * 16]float32
		gemm(a, b, off, &got)
		gemmGo(a, b, off, &port)
		for i := range tileRows * 16 {
			row, j := i/16, i%16
			var want float64
			for kk := range k {
				want += float64(a[tileRows*kk+row]) * float64(b[int(off[kk])+j])
			}
			tol := 1e-5 * math.Sqrt(float64(k)) * 4
			if math.Abs(float64(got[i])-want) > tol || math.Abs(float64(port[i])-want) > tol {
				t.Fatalf("k=%d c[%d]: kernel %v, portable %v, want %v", k, i, got[i], port[i], want)
			}
		}
	}
}

// naiveConv is the textbook 3×3 zero-padded convolution in float64.
func naiveConv(in fmap, w, bias []float32, cout int, res *fmap, relu bool) []float64 {
	h, wd := in.h, in.w
	out := make([]float64, cout*h*wd)
	for co := range cout {
		for y := range h {
			for x := range wd {
				s := float64(bias[co])
				for ci := range in.c {
					for ky := range 3 {
						for kx := range 3 {
							sy, sx := y+ky-1, x+kx-1
							if sy < 0 || sy >= h || sx < 0 || sx >= wd {
								continue
							}
							s += float64(w[((co*in.c+ci)*3+ky)*3+kx]) * float64(in.d[(ci*h+sy)*wd+sx])
						}
					}
				}
				if res != nil {
					s += float64(res.d[(co*h+y)*wd+x])
				}
				if relu && s < 0 {
					s = 0
				}
				out[(co*h+y)*wd+x] = s
			}
		}
	}
	return out
}

// padded lays an unpadded c×h×w map out as an fmap.
func padded(c, h, w int, d []float32) fmap {
	m := fmapOn(make([]float32, fmapLen(c, h, w)), c, h, w)
	for i := range m.d[c*m.plane():] {
		m.d[c*m.plane()+i] = float32(math.NaN()) // slack: must never reach a kept output
	}
	for ch := range c {
		for y := range h {
			copy(m.d[ch*m.plane()+(y+1)*m.stride()+1:], d[(ch*h+y)*w:(ch*h+y+1)*w])
		}
	}
	return m
}

func unpadded(m fmap) []float32 {
	d := make([]float32, m.c*m.h*m.w)
	for ch := range m.c {
		for y := range m.h {
			o := ch*m.plane() + (y+1)*m.stride() + 1
			copy(d[(ch*m.h+y)*m.w:], m.d[o:o+m.w])
		}
	}
	return d
}

func TestConv3AgainstNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(23, 24))
	cases := []struct{ cin, cout, h, w int }{
		{3, 5, 4, 3}, {16, 64, 5, 17}, {64, 3, 3, 40}, {4, 8, 1, 1}, {8, 8, 18, 33},
	}
	for _, c := range cases {
		in0, res0 := randFloats(r, c.cin*c.h*c.w), randFloats(r, c.cout*c.h*c.w)
		in := padded(c.cin, c.h, c.w, in0)
		wt, bias := randFloats(r, c.cout*c.cin*9), randFloats(r, c.cout)
		res := padded(c.cout, c.h, c.w, res0)
		cv := newConv3(c.cin, c.cout, wt, bias)
		for _, withRes := range []bool{false, true} {
			var rp *fmap
			if withRes {
				rp = &res
			}
			out := fmapOn(make([]float32, fmapLen(c.cout, c.h, c.w)), c.cout, c.h, c.w)
			cv.apply(in, out, rp, withRes)
			var rn *fmap
			if withRes {
				rn = &fmap{c.cout, c.h, c.w, res0}
			}
			want := naiveConv(fmap{c.cin, c.h, c.w, in0}, wt, bias, c.cout, rn, withRes)
			got := unpadded(out)
			for i, v := range want {
				if math.Abs(float64(got[i])-v) > 1e-4 {
					t.Fatalf("%+v res=%v: out[%d] = %v, want %v", c, withRes, i, got[i], v)
				}
			}
		}
	}
}
