//go:build linux

package arena_test

import (
	"log/slog"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
)

// benchChurn allocates and frees regions of mixed sizes (256 B to 64 KiB,
// some tensor-sized up to 4 MiB) with about 1000 live regions, the shape
// of LoRA factor churn beside resident weights.
func benchChurn(b *testing.B, backend arena.Backend) {
	a, err := arena.New(b.Context(), backend, arena.Config{
		Capacity: 4 << 30, SegmentSize: 64 << 20, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	rng := rand.New(rand.NewPCG(7, 7))
	sizes := make([]uint64, 4096)
	for i := range sizes {
		sizes[i] = uint64(256 + rng.IntN(64<<10))
		if i%64 == 0 {
			sizes[i] = uint64(1<<20 + rng.IntN(3<<20))
		}
	}
	live := make([]arena.Region, 0, 1024)
	for len(live) < cap(live) {
		r, err := a.Alloc(arena.HostOwner, "resident", sizes[len(live)])
		if err != nil {
			b.Fatal(err)
		}
		live = append(live, r)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		k := rng.IntN(len(live))
		if err := a.Free(live[k]); err != nil {
			b.Fatal(err)
		}
		r, err := a.Alloc(arena.HostOwner, "churn", sizes[i%len(sizes)])
		if err != nil {
			b.Fatal(err)
		}
		live[k] = r
	}
	b.StopTimer()
	st := a.Stats()
	b.ReportMetric(st.Fragmentation, "fragmentation")
	b.ReportMetric(float64(st.Segments), "segments")
}

func BenchmarkAllocFreeChurn(b *testing.B) {
	b.Run("fake-device", func(b *testing.B) { benchChurn(b, arenatest.NewFakeDevice(0)) })
	b.Run("cpu-memfd", func(b *testing.B) {
		be, err := arena.NewCPUBackend(arena.CPUConfig{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		benchChurn(b, be)
	})
}

// BenchmarkAllocFreeSmall is the fast path: one small region in and out.
func BenchmarkAllocFreeSmall(b *testing.B) {
	a, err := arena.New(b.Context(), arenatest.NewFakeDevice(0), arena.Config{Capacity: 1 << 30, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	b.ReportAllocs()
	for b.Loop() {
		r, err := a.Alloc(arena.HostOwner, "small", 1000)
		if err != nil {
			b.Fatal(err)
		}
		if err := a.Free(r); err != nil {
			b.Fatal(err)
		}
	}
}
