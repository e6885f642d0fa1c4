//go:build amd64

package render

import "golang.org/x/sys/cpu"

// haveAVX2 selects the assembly micro-kernel (AVX2 with FMA3, and an OS
// that saves the YMM registers, which cpu.X86.HasAVX2 includes).
var haveAVX2 = cpu.X86.HasAVX2 && cpu.X86.HasFMA

//go:noescape
func gemm4x16AVX2(a, b *float32, off *int32, k int, c *[64]float32)

// gemm4x16 is the micro-kernel: c[r·16+j] = Σ_k a[4k+r]·b[off[k]+j] for
// r < 4, j < 16, k < len(off). The caller guarantees a holds 4·len(off)
// values and b holds off[k]+16 values for every k (the assembly does not
// check).
func gemm4x16(a, b []float32, off []int32, c *[64]float32) {
	if !haveAVX2 || len(off) == 0 {
		gemm4x16Go(a, b, off, c)
		return
	}
	_ = a[4*len(off)-1]
	_ = b[off[len(off)-1]+15] // off increases: its last entry is the farthest tap
	gemm4x16AVX2(&a[0], &b[0], &off[0], len(off), c)
}
