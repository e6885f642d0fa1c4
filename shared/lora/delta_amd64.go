//go:build amd64

package lora

import "github.com/arenahost/arenahost/shared/simd"

// The micro-kernels in delta_amd64.s: each adds groups gs and singles ss
// of B_cat·A_cat for rows rows over one strip of 64, 16 (AVX-512), 16 or 8
// (AVX2) columns, four rows at a time, bit for bit as factorsGo.

//go:noescape
func factors512x64(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)

//go:noescape
func factors512x16(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)

//go:noescape
func factors256x16(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)

//go:noescape
func factors256x8(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)

type factorKernel func(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int)

// factorsSIMD runs the vector kernels of path p over the columns [0, done)
// that whole strips cover and returns done; the caller finishes the rest
// with factorsGo. Column strips are the outer loop and the rank groups are
// cut into chunks whose A strip fits half the L1 data cache, so every row
// of the run reuses it from L1; a chunk's partial sums go back to dst,
// which changes no bit (the order is one chain of FMAs into d, rank after
// rank, and storing d between two of them rounds nothing).
func factorsSIMD(p simd.Path, dst []float32, ldd int, b []float32, ldb int, a []float32, lda int, gs, ss []int32, rows, cols int) (done int) {
	var wide, narrow int
	var kw, kn factorKernel
	switch p {
	case simd.AVX512:
		wide, narrow, kw, kn = 64, 16, factors512x64, factors512x16
	case simd.AVX2:
		wide, narrow, kw, kn = 16, 8, factors256x16, factors256x8
	default:
		return 0
	}
	if rows <= 0 || cols < narrow || (len(gs) == 0 && len(ss) == 0) {
		return 0
	}
	// The kernels check nothing: bound every access here.
	maxK := -1
	if len(gs) > 0 {
		maxK = int(gs[len(gs)-1]) + 3
	}
	if len(ss) > 0 {
		maxK = max(maxK, int(ss[len(ss)-1]))
	}
	_ = dst[(rows-1)*ldd+cols-1]
	_ = b[(rows-1)*ldb+maxK]
	_ = a[maxK*lda+cols-1]
	kc := groupsPerChunk(wide)
	var dummy int32
	at := func(x []int32, i int) *int32 {
		if i < len(x) {
			return &x[i]
		}
		return &dummy
	}
	// strip runs kernel k on rows [r0, r0+n) of the strip at column c,
	// chunk by chunk of groups, the singles with the last chunk.
	strip := func(k factorKernel, c, r0, n int) {
		for g0 := 0; ; g0 += kc {
			g1 := min(g0+kc, len(gs))
			ns := 0
			if g1 == len(gs) {
				ns = len(ss)
			}
			k(&dst[r0*ldd+c], ldd, &b[r0*ldb], ldb, &a[c], lda, at(gs, g0), g1-g0, at(ss, 0), ns, n)
			if g1 == len(gs) {
				return
			}
		}
	}
	for ; done+wide <= cols; done += wide {
		strip(kw, done, 0, rows)
	}
	for ; done+narrow <= cols; done += narrow {
		strip(kn, done, 0, rows)
	}
	return done
}
