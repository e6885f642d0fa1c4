package render

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// bf16Latent is a random bf16 latent (FLUX runs in bf16).
func bf16Latent(shape []int, layout Layout) Latent {
	r := rand.New(rand.NewPCG(11, 12))
	n := 1
	for _, d := range shape {
		n *= d
	}
	b := make([]uint16, n)
	for i := range b {
		b[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
	}
	return Latent{Data: u16Bytes(b), DType: BFloat16, Shape: shape, Layout: layout}
}

// reportPercentiles adds p50/p95 of per-iteration wall times and the mean
// process CPU time per iteration (since cpu0), in milliseconds. On a shared
// machine the wall figures include time spent waiting for a core; the CPU
// figure does not.
func reportPercentiles(b *testing.B, d []time.Duration, cpu0 time.Duration) {
	if len(d) == 0 {
		return
	}
	b.ReportMetric(float64(processCPU()-cpu0)/1e6/float64(len(d)), "cpu-ms/op")
	slices.Sort(d)
	at := func(q float64) float64 { return float64(d[min(len(d)-1, int(q*float64(len(d))))]) / 1e6 }
	b.ReportMetric(at(0.50), "p50-ms")
	b.ReportMetric(at(0.95), "p95-ms")
}

// BenchmarkRenderFlux is the renderer's share of publish-to-frame latency:
// a FLUX.1 1024² latent in bf16 (128×128×16 channel-major, and packed
// 64×64×64 token-major) to an encoded JPEG, at the default 512 cap and at
// the full 1024² size. Target: p95 ≤ 30 ms on 2 cores.
func BenchmarkRenderFlux(b *testing.B) {
	latents := []struct {
		name string
		l    Latent
	}{
		{"128x128x16", bf16Latent([]int{1, 16, 128, 128}, ChannelMajor)},
		{"packed64x64x64", bf16Latent([]int{1, 4096, 64}, TokenMajor)},
	}
	for _, lt := range latents {
		for _, side := range []int{512, 1024} {
			for _, filter := range []Filter{Nearest, Bilinear} {
				b.Run(fmt.Sprintf("%s/%d/%v/jpeg", lt.name, side, filter), func(b *testing.B) {
					o := Options{Family: FamilyFlux, MaxSide: side, Filter: filter}
					times := make([]time.Duration, 0, b.N)
					cpu0 := processCPU()
					var size int
					for b.Loop() {
						t0 := time.Now()
						img, err := Render(lt.l, o)
						if err != nil {
							b.Fatal(err)
						}
						out, err := Encode(img, Format{Kind: JPEG})
						if err != nil {
							b.Fatal(err)
						}
						times = append(times, time.Since(t0))
						size = len(out)
					}
					reportPercentiles(b, times, cpu0)
					b.ReportMetric(float64(size), "bytes")
				})
			}
		}
	}
}

// BenchmarkEncode separates the encoders' cost from rendering.
func BenchmarkEncode(b *testing.B) {
	l := bf16Latent([]int{1, 16, 128, 128}, ChannelMajor)
	for _, side := range []int{512, 1024} {
		img, err := Render(l, Options{Family: FamilyFlux, MaxSide: side})
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range []Format{{Kind: JPEG}, {Kind: PNG}} {
			b.Run(fmt.Sprintf("%d/%v", side, f.Kind), func(b *testing.B) {
				times := make([]time.Duration, 0, b.N)
				cpu0 := processCPU()
				for b.Loop() {
					t0 := time.Now()
					if _, err := Encode(img, f); err != nil {
						b.Fatal(err)
					}
					times = append(times, time.Since(t0))
				}
				reportPercentiles(b, times, cpu0)
			})
		}
	}
}

// BenchmarkDecoder is one TAESD preview: a FLUX.1 1024² latent (128×128×16,
// bf16) shrunk to the decoder side, decoded by a taef1-shaped decoder
// (random weights), resized to the 512 default cap and JPEG-encoded.
// Target: under 200 ms on 2 cores at DefaultDecoderLatentSide.
func BenchmarkDecoder(b *testing.B) {
	r := rand.New(rand.NewPCG(41, 42))
	d, err := ParseDecoder("taef1-random", stFile(randomDecoder(r, 16), "F32"))
	if err != nil {
		b.Fatal(err)
	}
	l := bf16Latent([]int{1, 16, 128, 128}, ChannelMajor)
	for _, side := range []int{DefaultDecoderLatentSide, 24, 32} {
		b.Run(fmt.Sprintf("latent%d/out%d", side, 8*side), func(b *testing.B) {
			o := Options{Family: FamilyFlux, Decoder: d, DecoderLatentSide: side, Filter: Bilinear}
			times := make([]time.Duration, 0, b.N)
			cpu0 := processCPU()
			for b.Loop() {
				t0 := time.Now()
				img, err := Render(l, o)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := Encode(img, Format{Kind: JPEG}); err != nil {
					b.Fatal(err)
				}
				times = append(times, time.Since(t0))
			}
			reportPercentiles(b, times, cpu0)
			macs := 282.8e9 * float64(side*side) / (128 * 128)
			b.ReportMetric(macs*2/1e9/(float64(b.Elapsed().Seconds())/float64(b.N)), "GFLOPS")
		})
	}
}

// BenchmarkConv3 is one 64→64 3×3 convolution (the decoder's unit of work).
func BenchmarkConv3(b *testing.B) {
	r := rand.New(rand.NewPCG(43, 44))
	for _, side := range []int{32, 128} {
		b.Run(fmt.Sprint(side), func(b *testing.B) {
			in := padded(64, side, side, randFloats(r, 64*side*side))
			out := fmapOn(make([]float32, fmapLen(64, side, side)), 64, side, side)
			cv := newConv3(64, 64, randFloats(r, 64*64*9), randFloats(r, 64))
			for b.Loop() {
				cv.apply(in, out, nil, true)
			}
			flops := 2 * 64 * 576 * float64(side*side)
			b.ReportMetric(flops/1e9/(b.Elapsed().Seconds()/float64(b.N)), "GFLOPS")
		})
	}
}

// BenchmarkGemm is the micro-kernel alone, on cache-resident data.
func BenchmarkGemm(b *testing.B) {
	r := rand.New(rand.NewPCG(45, 46))
	a, bb := randFloats(r, tileRows*576), randFloats(r, 16*576)
	off := make([]int32, 576)
	for i := range off {
		off[i] = int32(16 * i)
	}
	var c [tileRows * 16]float32
	for b.Loop() {
		gemm(a, bb, off, &c)
	}
	b.ReportMetric(2*tileRows*16*576/1e9/(b.Elapsed().Seconds()/float64(b.N)), "GFLOPS")
}
