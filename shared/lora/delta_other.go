//go:build !amd64

package lora

import "github.com/arenahost/arenahost/shared/simd"

// factorsSIMD has no vector kernels off amd64: factorsGo does all columns.
func factorsSIMD(simd.Path, []float32, int, []float32, int, []float32, int, []int32, []int32, int, int, bool) int {
	return 0
}

func addVec(dst, a, b []float32) int { return 0 }

func fitVec(w, orig, delta []float32, acc *[24]float64) int { return 0 }
