package registry

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// benchLoadMiB is the size of BenchmarkLoad's checkpoint; override it with
// ARENAHOST_BENCH_LOAD_MIB.
const benchLoadMiB = 1024

// BenchmarkLoad measures loading a ~1 GiB bnb-nf4 (nested) checkpoint with
// Flux-sized weights ([9216, 3072], blocksize 64) into a CPU arena, against
// the floor of reading the same file once with read(2) into a reused
// buffer, in the same run and with the file in the page cache for both.
// It prints both throughputs and their ratio (load time / read time).
//
//	go test -run '^$' -bench '^BenchmarkLoad$' -benchtime 3x ./host/registry
func BenchmarkLoad(b *testing.B) {
	mib := benchLoadMiB
	if s := os.Getenv("ARENAHOST_BENCH_LOAD_MIB"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 {
			b.Fatalf("ARENAHOST_BENCH_LOAD_MIB=%q: want a positive integer", s)
		}
		mib = v
	}
	const rows, cols = 9216, 3072
	perWeight := int64(rows*cols/2 + rows*cols/64 + 2*rows + 8<<10) // packed, absmax, bias, small side tensors
	weights := int((int64(mib)<<20 + perWeight - 1) / perWeight)
	path := filepath.Join(b.TempDir(), "bench.safetensors")
	size := writeCheckpoint(b, path, checkpointSpec{rows: rows, cols: cols, weights: weights, blocksize: 64, nested: true, seed: 9, prefix: "model.diffusion_model."})
	b.Logf("checkpoint: %d nf4 weights [%d %d], %.1f MiB", weights, rows, cols, float64(size)/(1<<20))

	var floor, load time.Duration
	b.Run("read-floor", func(b *testing.B) {
		b.SetBytes(size)
		buf := make([]byte, 16<<20)
		for b.Loop() {
			f, err := os.Open(path)
			if err != nil {
				b.Fatal(err)
			}
			var n int64
			for {
				k, err := f.Read(buf)
				n += int64(k)
				if err == io.EOF {
					break
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			f.Close()
			if n != size {
				b.Fatalf("read %d of %d bytes", n, size)
			}
		}
		floor = b.Elapsed() / time.Duration(b.N)
	})
	loadBench := func(b *testing.B) {
		b.SetBytes(size)
		a := newTestArena(b, uint64(size)+(256<<20), 0)
		reg := New(a, quiet())
		ctx := context.Background()
		var total time.Duration
		for i := 0; i < b.N; i++ {
			start := time.Now()
			if _, err := reg.Load(ctx, "bench", path); err != nil {
				b.Fatal(err)
			}
			total += time.Since(start)
			b.StopTimer()
			if err := reg.Unload("bench"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		load = total / time.Duration(b.N)
	}
	b.Run("load-no-prefault", func(b *testing.B) {
		prefaultOn = false
		defer func() { prefaultOn = true }()
		loadBench(b)
	})
	noPrefault := load
	b.Run("load", loadBench)
	if floor > 0 && load > 0 {
		mibs := func(d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }
		fmt.Printf("BenchmarkLoad: %.0f MiB checkpoint: load into arena %.0f MiB/s (%v), read floor %.0f MiB/s (%v), load/read time ratio %.2f (without prefault %.0f MiB/s, ratio %.2f)\n",
			float64(size)/(1<<20), mibs(load), load.Round(time.Millisecond), mibs(floor), floor.Round(time.Millisecond), load.Seconds()/floor.Seconds(),
			mibs(noPrefault), noPrefault.Seconds()/floor.Seconds())
	}
}
