//go:build amd64

package lora

import "github.com/arenahost/arenahost/shared/simd"

//go:noescape
func addF32x512(dst, a, b *float32, n int)

//go:noescape
func fitSums512(w, orig, delta *float32, n int, acc *[24]float64)

//go:noescape
func addF32x256(dst, a, b *float32, n int)

//go:noescape
func fitSums256(w, orig, delta *float32, n int, acc *[24]float64)

// addVec sets dst[i] = a[i] + b[i] over a prefix a multiple of 16 long
// (AVX-512 or AVX2) and returns its length.
func addVec(dst, a, b []float32) int {
	n := len(dst) &^ 15
	p := simd.Current()
	if p == simd.Generic || n == 0 {
		return 0
	}
	_, _ = a[n-1], b[n-1]
	if p == simd.AVX512 {
		addF32x512(&dst[0], &a[0], &b[0], n)
	} else {
		addF32x256(&dst[0], &a[0], &b[0], n)
	}
	return n
}

// fitVec adds the retention sums of a prefix a multiple of 16 long into
// acc (8 lanes each) and returns its length.
func fitVec(w, orig, delta []float32, acc *[24]float64) int {
	n := len(w) &^ 15
	p := simd.Current()
	if p == simd.Generic || n == 0 {
		return 0
	}
	_, _ = orig[n-1], delta[n-1]
	if p == simd.AVX512 {
		fitSums512(&w[0], &orig[0], &delta[0], n, acc)
	} else {
		fitSums256(&w[0], &orig[0], &delta[0], n, acc)
	}
	return n
}
