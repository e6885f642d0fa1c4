package nf4

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
)

// benchElems is the element count of the throughput benchmarks: 64 Mi by
// default (the size testdata/bench_bnb.py times bitsandbytes on), or
// ARENAHOST_NF4_BENCH_ELEMS.
func benchElems(b *testing.B) int {
	if s := os.Getenv("ARENAHOST_NF4_BENCH_ELEMS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			b.Fatalf("ARENAHOST_NF4_BENCH_ELEMS=%q", s)
		}
		return n
	}
	return 64 << 20
}

// benchInput is random normal data rounded to bf16, as bench_bnb.py uses.
func benchInput(n int) []float32 {
	r := rand.New(rand.NewPCG(42, 43))
	x := make([]float32, n)
	for i := range x {
		x[i] = half.BF16ToF32(half.F32ToBF16(float32(r.NormFloat64() * 0.02)))
	}
	return x
}

func reportElems(b *testing.B, n int) {
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds()/1e6, "Melem/s")
}

// BenchmarkQuantize: float32 input (bf16 values), NF4, blocksize 64.
func BenchmarkQuantize(b *testing.B) {
	n := benchElems(b)
	x := benchInput(n)
	packed := make([]byte, PackedLen(n))
	absmax := make([]float32, Blocks(n, 64))
	b.SetBytes(int64(2 * n)) // bytes of the bf16 tensor bnb quantizes
	b.ResetTimer()
	for b.Loop() {
		Quantize(packed, absmax, x, 64, QuantNF4)
	}
	reportElems(b, n)
}

// BenchmarkQuantizeNested: Quantize plus QuantizeNested of its absmax
// (compress_statistics=True).
func BenchmarkQuantizeNested(b *testing.B) {
	n := benchElems(b)
	x := benchInput(n)
	packed := make([]byte, PackedLen(n))
	absmax := make([]float32, Blocks(n, 64))
	b.SetBytes(int64(2 * n))
	b.ResetTimer()
	for b.Loop() {
		Quantize(packed, absmax, x, 64, QuantNF4)
		QuantizeNested(absmax)
	}
	reportElems(b, n)
}

// BenchmarkDequantize: NF4, blocksize 64, to bf16 bytes (the logical dtype,
// as bnb's dequantize_4bit returns it).
func BenchmarkDequantize(b *testing.B) {
	n := benchElems(b)
	x := benchInput(n)
	packed := make([]byte, PackedLen(n))
	absmax := make([]float32, Blocks(n, 64))
	Quantize(packed, absmax, x, 64, QuantNF4)
	out := make([]byte, 2*n)
	b.SetBytes(int64(2 * n))
	b.ResetTimer()
	for b.Loop() {
		DequantizeTo(out, BFloat16, packed, absmax, &NF4, n, 64)
	}
	reportElems(b, n)
}

// BenchmarkDequantizeF32: NF4, blocksize 64, to float32.
func BenchmarkDequantizeF32(b *testing.B) {
	n := benchElems(b)
	x := benchInput(n)
	packed := make([]byte, PackedLen(n))
	absmax := make([]float32, Blocks(n, 64))
	Quantize(packed, absmax, x, 64, QuantNF4)
	b.SetBytes(int64(4 * n))
	b.ResetTimer()
	for b.Loop() {
		Dequantize(x, packed, absmax, &NF4, n, 64)
	}
	reportElems(b, n)
}
