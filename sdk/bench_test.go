package sdk_test

import (
	"sort"
	"testing"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

const (
	benchTensorBytes = 1 << 30
	// benchChunkBytes keeps each baseline message under the plugin
	// server's limit (sdk.MaxMessageBytes) and gRPC's 4 MiB default, so
	// the baseline needs no raised limits: 512 unary Invokes per GiB.
	benchChunkBytes = 2 << 20
)

// BenchmarkInvoke1GiB sums a 1 GiB F32 tensor in a real plugin process two
// ways in the same run: passed as a descriptor into a memfd (the plugin
// maps it and reads in place) and sent as bytes over the plugin's gRPC
// connection (AutoMTLS, as the host runs Go plugins) in 2 MiB msgpack
// chunks. Both sum the same values; the metric bytes/desc is the ratio.
//
//	go test -run '^$' -bench Invoke1GiB -benchtime 1x ./sdk
func BenchmarkInvoke1GiB(b *testing.B) {
	host := plugintest.NewFakeHost(b, benchTensorBytes+4096)
	const n = benchTensorBytes / 4
	d := host.Alloc(b, "bench.x", pluginv1.DType_DTYPE_F32, []int64{n}, pluginv1.Access_ACCESS_READ_ONLY)
	raw, err := host.Bytes(d)
	if err != nil {
		b.Fatal(err)
	}
	xs, err := tensor.Float32s(raw)
	if err != nil {
		b.Fatal(err)
	}
	var want float64
	for i := range xs {
		xs[i] = float32(i%1000) * 0.5 // halves: the sum is exact in any order
		want += float64(xs[i])
	}
	p := plugintest.Start(b, plugintest.Config{Cmd: self(b), Env: []string{envRole + "=plugin"}, Host: host})

	byDescriptor := func() time.Duration {
		start := time.Now()
		resp, err := p.Client.Invoke(b.Context(), &pluginv1.InvokeRequest{Method: sdk.ConformanceSum, Tensors: []*pluginv1.TensorDescriptor{d}})
		took := time.Since(start)
		if err != nil {
			b.Fatalf("invoke by descriptor: %v", err)
		}
		var r sumResult
		if err := msgpack.Unmarshal(resp.GetResult(), &r); err != nil || r.Sum != want || r.Count != n {
			b.Fatalf("by descriptor: sum %v count %d (%v), want %v and %d", r.Sum, r.Count, err, want, n)
		}
		return took
	}
	byBytes := func() time.Duration {
		start := time.Now()
		var sum float64
		var count int64
		for off := 0; off < len(raw); off += benchChunkBytes {
			args, err := msgpack.Marshal(chunkArgs{Data: raw[off : off+benchChunkBytes]})
			if err != nil {
				b.Fatal(err)
			}
			resp, err := p.Client.Invoke(b.Context(), &pluginv1.InvokeRequest{Method: "bench.sum_bytes", Args: args})
			if err != nil {
				b.Fatalf("invoke with bytes at offset %d: %v", off, err)
			}
			var r sumResult
			if err := msgpack.Unmarshal(resp.GetResult(), &r); err != nil {
				b.Fatal(err)
			}
			sum += r.Sum
			count += r.Count
		}
		took := time.Since(start)
		if sum != want || count != n {
			b.Fatalf("by bytes: sum %v count %d, want %v and %d", sum, count, want, n)
		}
		return took
	}

	// The first descriptor call maps the segment and faults its pages in;
	// later calls reuse the cached mapping, as a long-lived plugin does.
	first := byDescriptor()
	b.ResetTimer()
	var desc, bytes time.Duration
	for range b.N {
		desc += byDescriptor()
		bytes += byBytes()
	}
	b.StopTimer()
	desc /= time.Duration(b.N)
	bytes /= time.Duration(b.N)
	b.ReportMetric(float64(first.Microseconds())/1e3, "desc-first-ms")
	b.ReportMetric(float64(desc.Microseconds())/1e3, "desc-ms")
	b.ReportMetric(float64(bytes.Microseconds())/1e3, "bytes-ms")
	b.ReportMetric(float64(bytes)/float64(desc), "bytes/desc")
	b.Logf("1 GiB F32 sum in a plugin: descriptor %v (first call %v), bytes over gRPC in %d MiB chunks %v: %.1fx",
		desc, first, benchChunkBytes>>20, bytes, float64(bytes)/float64(desc))
}

// BenchmarkInvokeRoundTrip measures one small Invoke (conformance.echo)
// against a real Go plugin process and reports p50 and p99.
//
//	go test -run '^$' -bench InvokeRoundTrip -benchtime 2000x ./sdk
func BenchmarkInvokeRoundTrip(b *testing.B) {
	p := plugintest.Start(b, plugintest.Config{Cmd: self(b), Env: []string{envRole + "=plugin"}})
	args, err := msgpack.Marshal(map[string]any{"payload": map[string]any{"step": 1, "name": "x"}})
	if err != nil {
		b.Fatal(err)
	}
	req := &pluginv1.InvokeRequest{Method: sdk.ConformanceEcho, Args: args}
	for range 50 { // warm the connection
		if _, err := p.Client.Invoke(b.Context(), req); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := p.Client.Invoke(b.Context(), req); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
	b.Logf("Invoke round trip over %d calls: p50 %v, p99 %v", len(lat), p50, p99)
}
