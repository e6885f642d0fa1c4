//go:build amd64

package simd

import "golang.org/x/sys/cpu"

// best: AVX2 kernels need AVX2 and FMA3 (the delta product's
// VFMADD231PS; x/sys/cpu checks the OS saves YMM); the AVX-512 ones use F
// (its FMA included), BW (byte shuffles), VL and DQ, and x/sys/cpu checks
// the OS saves the ZMM and mask registers.
var best = func() Path {
	switch {
	case cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512DQ:
		return AVX512
	case cpu.X86.HasAVX2 && cpu.X86.HasFMA:
		return AVX2
	}
	return Generic
}()
