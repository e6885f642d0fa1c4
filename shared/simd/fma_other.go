//go:build !amd64

package simd

func fmaVec(d, a, b *float32, n int) { panic("simd: no FMA instruction off amd64") }

const hasFMA = false
