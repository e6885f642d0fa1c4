package nf4

import (
	"math"
	"math/big"
	"slices"
)

// TorchDynamicMap computes bitsandbytes' create_dynamic_map(signed=True,
// max_exponent_bits=7, total_bits=8) the way torch evaluates it on the CPU,
// the map bitsandbytes stores as nested_quant_map. Its only CPU-dependent
// step is torch.linspace, whose serial kernel computes start + step*i (end -
// step*k for the upper half) in float32: torch's AVX2 and AVX512 kernels are
// compiled with fused multiply-add, its DEFAULT kernels are not. fma selects
// the fused variant, which is DynamicMap(); the unfused one differs in 42 of
// the 256 entries by up to two ulps. Everything else is float32 arithmetic
// that FMA cannot change: the means (b[i]+b[i+1])/2 and the scaling by
// float32(10^e).
func TorchDynamicMap(fma bool) [256]float32 {
	data := make([]float32, 0, 256)
	for i := range 7 {
		b := torchLinspace(0.1, 1, 1<<i+1, fma)
		s := float32(math.Pow(10, float64(i-6)))
		for _, sign := range []float32{1, -1} {
			for j := 0; j+1 < len(b); j++ {
				data = append(data, (sign*s)*((b[j]+b[j+1])/2))
			}
		}
	}
	data = append(data, 0, 1)
	slices.Sort(data)
	var m [256]float32
	copy(m[:], data)
	return m
}

// torchLinspace is torch's CPU linspace_kernel for float32: the lower half
// counts up from start, the upper half down from end.
func torchLinspace(start, end float32, steps int, fma bool) []float32 {
	step := (end - start) / float32(steps-1)
	out := make([]float32, steps)
	for i := range out {
		a, k, c := step, float32(i), start
		if i >= steps/2 {
			a, k, c = -step, float32(steps-i-1), end
		}
		if fma {
			out[i] = fma32(a, k, c)
		} else {
			p := a * k
			out[i] = c + p
		}
	}
	return out
}

// fma32 is a float32 fused multiply-add, rounded once: a*b+c is exact in
// 256 bits for float32 operands.
func fma32(a, b, c float32) float32 {
	x := new(big.Float).SetPrec(256).SetFloat64(float64(a))
	x.Mul(x, new(big.Float).SetPrec(256).SetFloat64(float64(b)))
	x.Add(x, new(big.Float).SetPrec(256).SetFloat64(float64(c)))
	f, _ := x.Float32()
	return f
}
