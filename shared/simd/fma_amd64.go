//go:build amd64

package simd

import "golang.org/x/sys/cpu"

// fmaVec sets d[i] = fma(a[i], b[i], d[i]) for i < n (n a multiple of 8)
// with VFMADD231PS: the hardware's float32 FMA, which the tests hold
// FMA32 to.
//
//go:noescape
func fmaVec(d, a, b *float32, n int)

// hasFMA reports whether the CPU has the FMA3 instructions fmaVec uses.
var hasFMA = cpu.X86.HasFMA && cpu.X86.HasAVX
