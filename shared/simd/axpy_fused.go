//go:build arm64 || ppc64le || s390x || riscv64 || loong64

package simd

// AxpyFMA32 sets y[i] = FMA32(a, x[i], y[i]) for every i < len(y) (x at
// least as long): one rank of the delta product over a row. On these
// architectures Go compiles a*x[i] + y[i] on float32 to the hardware's
// fused multiply-add (FMADDS, FMADD.S, WFMASB: one rounding; the spec
// allows the fusion and the compiler does it, checked in the disassembly
// of each), which TestFMA32 holds to FMA32.
func AxpyFMA32(y, x []float32, a float32) {
	x = x[:len(y)]
	for i := range y {
		y[i] = a*x[i] + y[i]
	}
}
