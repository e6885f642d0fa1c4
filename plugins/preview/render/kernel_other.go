//go:build !amd64

package render

// gemm4x16 is the micro-kernel; without AVX2 assembly it is portable Go.
func gemm4x16(a, b []float32, off []int32, c *[64]float32) { gemm4x16Go(a, b, off, c) }
