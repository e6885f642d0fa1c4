package lora

import (
	"github.com/arenahost/arenahost/shared/simd"
)

// rankPattern is the work one B_cat row asks for: the groups of four ranks
// with a nonzero b (first rank of each) and, past the last whole group,
// the single ranks with a nonzero b. The scalar order skips exactly the
// others, so rows with one pattern can run through one kernel call.
type rankPattern struct {
	gs, ss []int32
}

func (p *rankPattern) of(brow []float32) {
	p.gs, p.ss = p.gs[:0], p.ss[:0]
	k := 0
	for ; k+4 <= len(brow); k += 4 {
		if brow[k] != 0 || brow[k+1] != 0 || brow[k+2] != 0 || brow[k+3] != 0 {
			p.gs = append(p.gs, int32(k))
		}
	}
	for ; k < len(brow); k++ {
		if brow[k] != 0 {
			p.ss = append(p.ss, int32(k))
		}
	}
}

func (p *rankPattern) equal(q *rankPattern) bool {
	if len(p.gs) != len(q.gs) || len(p.ss) != len(q.ss) {
		return false
	}
	for i, v := range p.gs {
		if q.gs[i] != v {
			return false
		}
	}
	for i, v := range p.ss {
		if q.ss[i] != v {
			return false
		}
	}
	return true
}

// addFactors adds B·A into dst [rows × in] (writes it, with set: the
// bits of clearing dst first) for B rows b [rows × rank] and A [rank × in],
// in DeltaRows' order, on the current simd path. Rows are taken in runs
// that share a rank pattern (a row tile usually is one run; runs break
// where a module's pieces start or end in B_cat).
func addFactors(dst, b []float32, rank int, a []float32, in, rows int, set bool) {
	if rank == 0 || rows == 0 || in == 0 {
		if set {
			clear(dst[:rows*in])
		}
		return
	}
	path := simd.Current()
	var cur, next rankPattern
	cur.of(b[:rank])
	for r := 0; r < rows; {
		e := r + 1
		for ; e < rows; e++ {
			next.of(b[e*rank : (e+1)*rank])
			if !next.equal(&cur) {
				break
			}
		}
		d, bb := dst[r*in:], b[r*rank:]
		if len(cur.gs)+len(cur.ss) > 0 {
			done := factorsSIMD(path, d, in, bb, rank, a, in, cur.gs, cur.ss, e-r, in, set)
			if done < in {
				if set {
					for i := range e - r {
						clear(d[i*in+done : (i+1)*in])
					}
				}
				factorsGo(d, in, bb, rank, a, in, cur.gs, cur.ss, e-r, done, in)
			}
		} else if set {
			clear(d[:(e-r)*in])
		}
		cur, next = next, cur
		r = e
	}
}

// factorsGo is the portable kernel: columns [c0, c1) of rows rows, in the
// kernels' order: per element d = fma(b_k, a_k, d) for the four ranks of
// each group in turn, then for each single rank, each FMA rounded once to
// float32 (simd.FMA32, exact; the hardware's FMA gives the same bits).
func factorsGo(dst []float32, ldd int, b []float32, ldb int, a []float32, lda int, gs, ss []int32, rows, c0, c1 int) {
	n := c1 - c0
	for r := 0; r < rows; r++ {
		o := dst[r*ldd+c0 : r*ldd+c1]
		brow := b[r*ldb:]
		// Rank after rank over the row: each element's chain of FMAs runs
		// in the same order as element by element.
		for _, k32 := range gs {
			k := int(k32)
			for kk := k; kk < k+4; kk++ {
				simd.AxpyFMA32(o, a[kk*lda+c0:][:n], brow[kk])
			}
		}
		for _, k32 := range ss {
			k := int(k32)
			simd.AxpyFMA32(o, a[k*lda+c0:][:n], brow[k])
		}
	}
}

// groupsPerChunk is how many rank groups of a strip wide columns wide fit
// in half the L1 data cache (at least one).
func groupsPerChunk(wide int) int {
	return max(1, simd.CacheSizes().L1D/2/(4*wide*4))
}
