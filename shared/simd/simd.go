// Package simd owns the choice of the CPU vector path that the NF4 codec
// and the LoRA delta product run on, and the cache sizes their tiles are
// cut from.
//
// The path is picked once, at start, from what the CPU and OS support
// (golang.org/x/sys/cpu): AVX-512 (F, BW, VL, DQ) over AVX2 over the
// portable Go code. ARENAHOST_SIMD=off|generic|avx2|avx512 forces one;
// asking for a path the CPU lacks logs a warning and uses the best one it
// has below it. Every path gives the same bits: the kernels keep the
// scalar code's order of every sum and product, so the choice changes
// speed only. The NF4 codec uses no FMA (each product and sum rounded on
// its own, as bitsandbytes rounds them); the LoRA delta product is a chain
// of fused multiply-adds, one rounding per rank, which the vector kernels
// run with their FMA instructions and the portable code with FMA32, an
// exact float32 FMA.
package simd

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
)

// Path is a vector instruction set the kernels are written for.
type Path int

// The paths, weakest first.
const (
	Generic Path = iota // portable Go
	AVX2                // 256-bit AVX2 (x86-64-v3)
	AVX512              // 512-bit AVX-512 F/BW/VL/DQ (x86-64-v4)
)

// EnvVar forces a path: off or generic, avx2, avx512 (auto or empty: the
// best the CPU has).
const EnvVar = "ARENAHOST_SIMD"

func (p Path) String() string {
	switch p {
	case AVX2:
		return "avx2"
	case AVX512:
		return "avx512"
	}
	return "generic"
}

// ParsePath reads an ARENAHOST_SIMD value; auto reports ok with auto true.
func ParsePath(s string) (p Path, auto bool, err error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return Generic, true, nil
	case "off", "generic", "none", "go":
		return Generic, false, nil
	case "avx2":
		return AVX2, false, nil
	case "avx512":
		return AVX512, false, nil
	}
	return Generic, false, fmt.Errorf("%s=%q: want off, avx2, avx512 or auto", EnvVar, s)
}

// Supported reports whether this CPU (and OS) can run path p.
func Supported(p Path) bool { return p <= best }

// Best is the strongest path this CPU supports.
func Best() Path { return best }

var current atomic.Int32

func init() {
	p, auto, err := ParsePath(os.Getenv(EnvVar))
	switch {
	case err != nil:
		slog.Warn("simd: ignoring a bad setting", "err", err, "using", best.String())
		p = best
	case auto:
		p = best
	case p > best:
		slog.Warn("simd: the CPU lacks the forced path", "want", p.String(), "using", best.String())
		p = best
	}
	current.Store(int32(p))
}

// Current is the path the kernels run on now.
func Current() Path { return Path(current.Load()) }

// Force makes the kernels run on p (clamped to what the CPU supports) and
// returns the path that was in use, for tests and benchmarks that compare
// paths. ok is false when the CPU lacks p.
func Force(p Path) (prev Path, ok bool) {
	ok = Supported(p)
	if !ok {
		p = best
	}
	return Path(current.Swap(int32(p))), ok
}
