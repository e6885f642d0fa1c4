package plugin

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func reportLatencies(b *testing.B, prefix string, ds []time.Duration) {
	b.ReportMetric(float64(percentile(ds, 0.50).Microseconds()), prefix+"p50-µs")
	b.ReportMetric(float64(percentile(ds, 0.99).Microseconds()), prefix+"p99-µs")
}

// BenchmarkInvokeGo measures a Manager.Call round trip to a Go plugin (the
// fixture's "gen": msgpack in and out, no tensors).
func BenchmarkInvokeGo(b *testing.B) {
	m, _ := newTestManager(b, Config{})
	addFixture(b, m, b.TempDir(), "echo", "echo", nil)
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		if _, _, err := callGen(ctx, m, "echo", "x"); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportLatencies(b, "", lat)
}

// BenchmarkInvokePython measures a Manager.Call round trip to the Python
// SDK's example plugin ("stats" over a 16-float tensor mapped zero-copy).
func BenchmarkInvokePython(b *testing.B) {
	python := testenv.Python(b)
	arena := newFakeArena(b, 1<<20)
	m, _ := newTestManager(b, Config{Arena: arena, Env: map[string]string{"ARENAHOST_PYTHON": python}})
	man, err := manifest.Parse(copyPythonExample(b))
	if err != nil {
		b.Fatal(err)
	}
	if err := m.Add(context.Background(), man); err != nil {
		b.Fatal(err)
	}
	x, _ := f32Tensor(b, arena, "x", 16, pluginv1.Access_ACCESS_READ_ONLY, func(i int) float32 { return float32(i) })
	ts := []*pluginv1.TensorDescriptor{x}
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		if _, err := m.Call(ctx, "hello-py", "stats", nil, ts); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportLatencies(b, "", lat)
}

// BenchmarkSwap measures Manager.Swap of a Go plugin (start, health,
// Describe, warm-up, switch, drain, kill) while two goroutines keep
// calling it, and the worst call latency those callers saw, next to the
// worst they saw in one second of the same load without swaps.
func BenchmarkSwap(b *testing.B) {
	m, _ := newTestManager(b, Config{})
	addFixture(b, m, b.TempDir(), "echo", "echo", nil)
	ctx, cancel := context.WithCancel(context.Background())
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		worst time.Duration
		calls int
	)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				t0 := time.Now()
				if _, _, err := callGen(context.Background(), m, "echo", ""); err != nil {
					b.Error(err)
					return
				}
				d := time.Since(t0)
				mu.Lock()
				worst = max(worst, d)
				calls++
				mu.Unlock()
			}
		}()
	}
	// Baseline: the same load for a second without swaps.
	time.Sleep(time.Second)
	mu.Lock()
	baseline, baseCalls := worst, calls
	worst, calls = 0, 0
	mu.Unlock()

	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		if err := m.Swap(context.Background(), "echo"); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	cancel()
	wg.Wait()
	reportLatencies(b, "swap-", lat)
	b.ReportMetric(float64(worst.Microseconds()), "worst-call-µs")
	b.ReportMetric(float64(calls), "calls")
	b.ReportMetric(float64(baseline.Microseconds()), "worst-call-no-swap-µs")
	b.ReportMetric(float64(baseCalls), "calls-no-swap-1s")
}
