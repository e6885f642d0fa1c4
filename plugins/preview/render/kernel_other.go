//go:build !amd64

package render

// gemm is the micro-kernel; without AVX2 assembly it is portable Go.
func gemm(a, b []float32, off []int32, c *[tileRows * 16]float32) { gemmGo(a, b, off, c) }
