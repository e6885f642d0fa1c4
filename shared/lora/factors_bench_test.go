package lora

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/shared/simd"
)

// BenchmarkDeltaRows is the fused pass's delta phase alone: SetDeltaRows over
// a Flux MLP layer [12288 × 3072] in row tiles, on GOMAXPROCS workers as
// fuseLayer runs it, per simd path, for 1 and 5 rank-16 LoRAs (Σr 16 and
// 80). GFLOP/s counts a multiply and an add per rank per element (2·Σr per
// weight); bench/run.sh prints it next to the machine's SGEMM.
func BenchmarkDeltaRows(b *testing.B) {
	const out, in = 12288, 3072
	rows := defaultTileElems() / in
	for _, rank := range []int{16, 80} {
		r := rand.New(rand.NewPCG(1, uint64(rank)))
		sl := &SideLayer{Layer: Layer{Out: out, In: in}, Rank: rank, A: make([]float32, rank*in), B: make([]float32, out*rank)}
		for i := range sl.A {
			sl.A[i] = float32(r.NormFloat64())
		}
		for i := range sl.B {
			sl.B[i] = float32(r.NormFloat64())
		}
		for _, p := range []simd.Path{simd.Generic, simd.AVX2, simd.AVX512} {
			b.Run(fmt.Sprintf("rank=%d/path=%s", rank, p), func(b *testing.B) {
				if !simd.Supported(p) {
					b.Skipf("this CPU lacks %s", p)
				}
				prev, _ := simd.Force(p)
				defer simd.Force(prev)
				workers := runtime.GOMAXPROCS(0)
				bufs := make([][]float32, workers)
				for i := range bufs {
					bufs[i] = make([]float32, rows*in)
				}
				b.ResetTimer()
				for range b.N {
					var wg sync.WaitGroup
					tiles := (out + rows - 1) / rows
					for w := range workers {
						wg.Go(func() {
							for t := w; t < tiles; t += workers {
								r0, r1 := t*rows, min(t*rows+rows, out)
								d := bufs[w][:(r1-r0)*in]
								sl.SetDeltaRows(d, r0, r1)
							}
						})
					}
					wg.Wait()
				}
				b.ReportMetric(2*float64(out)*float64(in)*float64(rank)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
			})
		}
	}
}
