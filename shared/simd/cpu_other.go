//go:build !amd64

package simd

var best = Generic
