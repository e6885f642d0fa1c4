//go:build amd64

package lora

import (
	"sync"

	"github.com/arenahost/arenahost/shared/simd"
)

// packMinRows is the shortest run of rows whose A strips are packed
// (factorsSIMD): a copy of the strip's ranks per strip, against the
// products of every row.
const packMinRows = 8

// packPool holds the packed A strips' buffers, one per concurrent call.
var packPool = sync.Pool{New: func() any { return new([]float32) }}

//go:generate sh -c "python3 gen_delta_asm.py > delta_amd64.s"

// The micro-kernels in delta_amd64.s (written by gen_delta_asm.py): each
// adds groups gs and singles ss of B_cat·A_cat for rows rows over one strip
// of 64, 16 (AVX-512), 16 or 8 (AVX2) columns, four rows at a time (then
// two, then one), bit for bit as factorsGo.

//go:noescape
func factors512x64(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int, zero int)

//go:noescape
func factors512x16(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int, zero int)

// packA64 and packA16 copy the 64 (16) floats at a + k·lda to dst + 64·k
// (16·k) for the four ranks k of each group in gs and each single rank in
// ss, with ZMM (YMM) moves.
//
//go:noescape
func packA64(dst *float32, a *float32, lda int, gs *int32, ng int, ss *int32, ns int)

//go:noescape
func packA16(dst *float32, a *float32, lda int, gs *int32, ng int, ss *int32, ns int)

//go:noescape
func factors256x16(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int, zero int)

//go:noescape
func factors256x8(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int, zero int)

type factorKernel func(dst *float32, ldd int, b *float32, ldb int, a *float32, lda int, gs *int32, ng int, ss *int32, ns int, rows int, zero int)

// factorsSIMD runs the vector kernels of path p over the columns [0, done)
// that whole strips cover and returns done; the caller finishes the rest
// with factorsGo. Column strips are the outer loop and the rank groups are
// cut into chunks whose A strip fits half the L1 data cache, so every row
// of the run reuses it from L1; a chunk's partial sums go back to dst,
// which changes no bit (the order is one chain of FMAs into d, rank after
// rank, and storing d between two of them rounds nothing). With set, the
// first chunk starts from +0 instead of dst's contents, as if dst had been
// cleared.
func factorsSIMD(p simd.Path, dst []float32, ldd int, b []float32, ldb int, a []float32, lda int, gs, ss []int32, rows, cols int, set bool) (done int) {
	var wide, narrow int
	var kw, kn factorKernel
	var pack func(dst *float32, a *float32, lda int, gs *int32, ng int, ss *int32, ns int)
	switch p {
	case simd.AVX512:
		wide, narrow, kw, kn, pack = 64, 16, factors512x64, factors512x16, packA64
	case simd.AVX2:
		wide, narrow, kw, kn, pack = 16, 8, factors256x16, factors256x8, packA16
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
	// A strip's rows sit In floats apart in A_cat: with In a multiple of
	// 1024 (every Flux width), all of them map to the same few L1 sets,
	// and a chunk of ranks thrashes the cache it was cut to fit (measured:
	// a quarter of the AVX-512 kernel's speed at In 3072). So, for runs of
	// rows long enough to repay it, each chunk's rows of a wide strip are
	// first copied into a dense buffer (row k at k·wide: packA64, packA16),
	// one copy per strip for all the rows of the run.
	var packed []float32
	if rows >= packMinRows && cols >= wide {
		bp := packPool.Get().(*[]float32)
		defer packPool.Put(bp)
		if need := (maxK + 1) * wide; cap(*bp) < need {
			*bp = make([]float32, need)
		}
		packed = (*bp)[:(maxK+1)*wide]
	}
	// strip runs kernel k on rows [r0, r0+n) of the strip at column c, w
	// wide, chunk by chunk of groups, the singles with the last chunk.
	strip := func(k factorKernel, c, w, r0, n int) {
		for g0 := 0; ; g0 += kc {
			g1 := min(g0+kc, len(gs))
			ns := 0
			if g1 == len(gs) {
				ns = len(ss)
			}
			ap, ldap := &a[c], lda
			if packed != nil && w == wide {
				pack(&packed[0], &a[c], lda, at(gs, g0), g1-g0, at(ss, 0), ns)
				ap, ldap = &packed[0], w
			}
			zero := 0
			if set && g0 == 0 {
				zero = 1
			}
			k(&dst[r0*ldd+c], ldd, &b[r0*ldb], ldb, ap, ldap, at(gs, g0), g1-g0, at(ss, 0), ns, n, zero)
			if g1 == len(gs) {
				return
			}
		}
	}
	for ; done+wide <= cols; done += wide {
		strip(kw, done, wide, 0, rows)
	}
	for ; done+narrow <= cols; done += narrow {
		strip(kn, done, narrow, 0, rows)
	}
	return done
}
