//go:build amd64

package render

import "golang.org/x/sys/cpu"

// haveAVX2 selects the assembly micro-kernel (AVX2 with FMA3, and an OS
// that saves the YMM registers, which cpu.X86.HasAVX2 includes).
var haveAVX2 = cpu.X86.HasAVX2 && cpu.X86.HasFMA

//go:noescape
func gemm6x16AVX2(a, b *float32, off *int32, k int, c *[tileRows * 16]float32)

// gemm is the micro-kernel: c[r·16+j] = Σ_k a[tileRows·k+r]·b[off[k]+j]
// for r < tileRows, j < 16, k < len(off). a must hold tileRows·len(off)
// values and b off[k]+16 values for every k; off must increase (the
// assembly checks nothing, so the bounds are checked here).
func gemm(a, b []float32, off []int32, c *[tileRows * 16]float32) {
	if !haveAVX2 || len(off) == 0 {
		gemmGo(a, b, off, c)
		return
	}
	_ = a[tileRows*len(off)-1]
	_ = b[off[len(off)-1]+15]
	gemm6x16AVX2(&a[0], &b[0], &off[0], len(off), c)
}
