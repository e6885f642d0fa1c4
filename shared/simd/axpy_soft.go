//go:build !(arm64 || ppc64le || s390x || riscv64 || loong64)

package simd

import "math"

// AxpyFMA32 sets y[i] = FMA32(a, x[i], y[i]) for every i < len(y) (x at
// least as long): one rank of the delta product over a row, with FMA32's
// common case inlined. (On amd64 Go fuses nothing unless GOAMD64=v3, so
// this is the software FMA; the vector kernels use the instruction.)
func AxpyFMA32(y, x []float32, a float32) {
	x = x[:len(y)]
	av := float64(a)
	for i, yv := range y {
		s := float64(av*float64(x[i])) + float64(yv)
		if math.Float64bits(s)&(1<<28-1) != 0 {
			y[i] = float32(s)
		} else {
			y[i] = FMA32(a, x[i], yv)
		}
	}
}
