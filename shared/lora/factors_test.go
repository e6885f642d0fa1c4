package lora

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/shared/simd"
)

// deltaRowsRef is DeltaRows written element by element, the order the
// CUDA kernel and its emulator reproduce: per element, one chain of
// float32 FMAs (simd.FMA32, tested against the CPU's FMA instruction),
// rank after rank, skipping a group of four ranks whose b are all zero and
// a single rank whose b is zero; then the dense delta added. The reference
// every simd path must equal bit for bit.
func deltaRowsRef(sl *SideLayer, dst []float32, r0, r1 int) {
	in := sl.In
	for r := r0; r < r1; r++ {
		out := dst[(r-r0)*in : (r-r0+1)*in]
		brow := sl.B[r*sl.Rank : (r+1)*sl.Rank]
		k := 0
		for ; k+4 <= len(brow); k += 4 {
			if brow[k] == 0 && brow[k+1] == 0 && brow[k+2] == 0 && brow[k+3] == 0 {
				continue
			}
			for j := range out {
				for kk := k; kk < k+4; kk++ {
					out[j] = simd.FMA32(brow[kk], sl.A[kk*in+j], out[j])
				}
			}
		}
		for ; k < len(brow); k++ {
			if brow[k] == 0 {
				continue
			}
			for j := range out {
				out[j] = simd.FMA32(brow[k], sl.A[k*in+j], out[j])
			}
		}
		if sl.Dense != nil {
			for j := range out {
				out[j] += sl.Dense[r*in+j]
			}
		}
	}
}

// forEachPath runs f once per simd path, forcing it, and logs the paths
// this CPU lacks (skipped, never silently).
func forEachPath(t *testing.T, f func(t *testing.T, p simd.Path)) {
	t.Helper()
	for _, p := range []simd.Path{simd.Generic, simd.AVX2, simd.AVX512} {
		t.Run(p.String(), func(t *testing.T) {
			if !simd.Supported(p) {
				t.Skipf("this CPU lacks %s (best: %s)", p, simd.Best())
			}
			prev, _ := simd.Force(p)
			t.Cleanup(func() { simd.Force(prev) })
			f(t, p)
		})
	}
}

// randSide builds a side layer with A and B of mixed magnitudes (some tiny,
// some huge, so rounding order shows), zero groups in some rows, and rows
// that break the rank pattern mid-tile, as module pieces in B_cat do.
func randSide(r *rand.Rand, out, in, rank int, dense bool) *SideLayer {
	sl := &SideLayer{Layer: Layer{Name: "l", Out: out, In: in}, Rank: rank,
		A: make([]float32, rank*in), B: make([]float32, out*rank)}
	for i := range sl.A {
		sl.A[i] = float32(r.NormFloat64() * math.Pow(10, float64(r.IntN(7)-3)))
	}
	for row := 0; row < out; row++ {
		for k := 0; k < rank; k++ {
			switch {
			case (row/3)%4 == 1 && k < rank/2: // a piece that leaves these ranks out
			case r.IntN(11) == 0:
			default:
				sl.B[row*rank+k] = float32(r.NormFloat64() * math.Pow(10, float64(r.IntN(5)-2)))
			}
		}
	}
	if dense {
		sl.Dense = make([]float32, out*in)
		for i := range sl.Dense {
			sl.Dense[i] = float32(r.NormFloat64())
		}
	}
	return sl
}

func TestDeltaRowsPaths(t *testing.T) {
	shapes := []struct{ out, in int }{{1, 1}, {5, 7}, {9, 64}, {13, 65}, {6, 100}, {17, 333}, {40, 1000}, {3, 3072}, {30, 1024}}
	ranks := []int{1, 3, 4, 16, 17, 64, 200}
	forEachPath(t, func(t *testing.T, p simd.Path) {
		r := rand.New(rand.NewPCG(19, uint64(p)))
		for _, sh := range shapes {
			for _, rank := range ranks {
				for _, dense := range []bool{false, true} {
					sl := randSide(r, sh.out, sh.in, rank, dense)
					// A tile in the middle and the whole layer, added onto
					// non-zero contents (DeltaRows adds).
					for _, rr := range [][2]int{{0, sh.out}, {sh.out / 3, sh.out - sh.out/4}} {
						n := (rr[1] - rr[0]) * sh.in
						got, want := make([]float32, n), make([]float32, n)
						for i := range got {
							got[i] = float32(i%7) - 3
							want[i] = got[i]
						}
						sl.DeltaRows(got, rr[0], rr[1])
						deltaRowsRef(sl, want, rr[0], rr[1])
						if i := firstDiff(got, want); i >= 0 {
							t.Fatalf("%s [%d %d] rank %d dense %v rows %v: element %d = %g (%#x), scalar order gives %g (%#x)",
								p, sh.out, sh.in, rank, dense, rr, i, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
						}
						// SetDeltaRows writes over whatever dst holds: the
						// bits of a cleared dst plus DeltaRows.
						for i := range got {
							got[i], want[i] = float32(math.NaN()), 0
						}
						sl.SetDeltaRows(got, rr[0], rr[1])
						deltaRowsRef(sl, want, rr[0], rr[1])
						if i := firstDiff(got, want); i >= 0 {
							t.Fatalf("%s [%d %d] rank %d dense %v rows %v: SetDeltaRows element %d = %g (%#x), scalar order gives %g (%#x)",
								p, sh.out, sh.in, rank, dense, rr, i, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
						}
					}
				}
			}
		}
	})
}

// TestDeltaRowsChunks: ranks beyond one L1 chunk of groups go through the
// kernels in several calls (each packing its own A rows); the result is
// still the scalar order's.
func TestDeltaRowsChunks(t *testing.T) {
	rank := 4*groupsPerChunk(64)*2 + 3
	forEachPath(t, func(t *testing.T, p simd.Path) {
		r := rand.New(rand.NewPCG(7, 7))
		// 21 rows: runs of 9 rows share a pattern, long enough for the
		// packed A strips (packMinRows).
		sl := randSide(r, 21, 200, rank, false)
		got, want := make([]float32, 21*200), make([]float32, 21*200)
		sl.DeltaRows(got, 0, 21)
		deltaRowsRef(sl, want, 0, 21)
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("rank %d: element %d = %g, want %g", rank, i, got[i], want[i])
		}
		for i := range got {
			got[i], want[i] = -1, 0
		}
		sl.SetDeltaRows(got, 0, 21)
		deltaRowsRef(sl, want, 0, 21)
		if i := firstDiff(got, want); i >= 0 {
			t.Fatalf("rank %d: SetDeltaRows element %d = %g, want %g", rank, i, got[i], want[i])
		}
	})
}

func firstDiff(a, b []float32) int {
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

func TestSimdForce(t *testing.T) {
	prev, ok := simd.Force(simd.Generic)
	defer simd.Force(prev)
	if !ok || simd.Current() != simd.Generic {
		t.Fatalf("forcing generic: ok %v, current %s", ok, simd.Current())
	}
	t.Log(fmt.Sprintf("best path on this CPU: %s; caches %+v", simd.Best(), simd.CacheSizes()))
}

// TestTileSteps: the tile's add is bit-exact and its retention sums agree
// with the scalar loop to 1e-12 relative on every path, on lengths around
// the vector width.
func TestTileSteps(t *testing.T) {
	forEachPath(t, func(t *testing.T, p simd.Path) {
		r := rand.New(rand.NewPCG(3, 3))
		for _, n := range []int{0, 1, 15, 16, 17, 33, 1000, 4099} {
			orig, delta, w := make([]float32, n), make([]float32, n), make([]float32, n)
			for i := range orig {
				orig[i], delta[i] = float32(r.NormFloat64()), float32(r.NormFloat64()*1e-3)
			}
			addTile(w, orig, delta)
			var dot, norm, diff float64
			for i := range w {
				if want := orig[i] + delta[i]; math.Float32bits(w[i]) != math.Float32bits(want) {
					t.Fatalf("n=%d: w[%d] = %g, want %g", n, i, w[i], want)
				}
				w[i] = float32(math.Round(float64(w[i])*64) / 64) // a coarse "re-quantization"
				eff, want := float64(w[i])-float64(orig[i]), float64(delta[i])
				dot, norm, diff = dot+eff*want, norm+want*want, diff+(eff-want)*(eff-want)
			}
			d, nn, e := fitSums(w, orig, delta)
			for _, c := range [][2]float64{{d, dot}, {nn, norm}, {e, diff}} {
				if math.Abs(c[0]-c[1]) > 1e-12*math.Abs(c[1]) {
					t.Fatalf("n=%d: sums %v, scalar %v", n, []float64{d, nn, e}, []float64{dot, norm, diff})
				}
			}
		}
	})
}
