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

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
)

// benchLoadMiB is the size of BenchmarkLoad's checkpoint; override it with
// ARENAHOST_BENCH_LOAD_MIB.
const benchLoadMiB = 1024

// benchDeviceLoadMiB is the size of BenchmarkDeviceLoad's checkpoint;
// override it with ARENAHOST_BENCH_DEVICE_LOAD_MIB.
const benchDeviceLoadMiB = 256

// benchMiB returns def, or the positive integer in the environment
// variable env.
func benchMiB(b *testing.B, env string, def int) int {
	s := os.Getenv(env)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		b.Fatalf("%s=%q: want a positive integer", env, s)
	}
	return v
}

// writeBenchCheckpoint writes a bnb-nf4 (nested) checkpoint of about mib
// MiB with Flux-sized weights ([9216, 3072], blocksize 64) under dir and
// returns its path and size.
func writeBenchCheckpoint(b *testing.B, dir string, mib int) (string, int64) {
	const rows, cols = 9216, 3072
	perWeight := int64(rows*cols/2 + rows*cols/64 + 2*rows + 8<<10) // packed, absmax, bias, small side tensors
	weights := int((int64(mib)<<20 + perWeight - 1) / perWeight)
	path := filepath.Join(dir, "bench.safetensors")
	size := writeCheckpoint(b, path, checkpointSpec{rows: rows, cols: cols, weights: weights, blocksize: 64, nested: true, seed: 9, prefix: "model.diffusion_model."})
	b.Logf("checkpoint: %d nf4 weights [%d %d], %.1f MiB", weights, rows, cols, float64(size)/(1<<20))
	return path, size
}

// BenchmarkLoad measures loading a ~1 GiB bnb-nf4 (nested) checkpoint with
// Flux-sized weights ([9216, 3072], blocksize 64) into a CPU arena, against
// the floor of reading the same file once with read(2) into a reused
// buffer, in the same run and with the file in the page cache for both.
// It prints both throughputs and their ratio (load time / read time).
//
//	go test -run '^$' -bench '^BenchmarkLoad$' -benchtime 3x ./host/registry
func BenchmarkLoad(b *testing.B) {
	path, size := writeBenchCheckpoint(b, b.TempDir(), benchMiB(b, "ARENAHOST_BENCH_LOAD_MIB", benchLoadMiB))

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
	b.Run("load-no-crc", func(b *testing.B) {
		loadCRCOn = false
		defer func() { loadCRCOn = true }()
		loadBench(b)
	})
	noCRC := load
	b.Run("load", loadBench)
	if floor > 0 && load > 0 {
		mibs := func(d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }
		fmt.Printf("BenchmarkLoad: %.0f MiB checkpoint: load into arena %.0f MiB/s (%v), read floor %.0f MiB/s (%v), load/read time ratio %.2f (without prefault %.0f MiB/s, ratio %.2f; without the load CRC %.0f MiB/s, ratio %.2f)\n",
			float64(size)/(1<<20), mibs(load), load.Round(time.Millisecond), mibs(floor), floor.Round(time.Millisecond), load.Seconds()/floor.Seconds(),
			mibs(noPrefault), noPrefault.Seconds()/floor.Seconds(), mibs(noCRC), noCRC.Seconds()/floor.Seconds())
	}
}

// BenchmarkDeviceLoad measures loading a ~256 MiB bnb-nf4 (nested)
// checkpoint with Flux-sized weights into a cuda-sim arena (gpusim's
// simulated device) two ways in the same run, with the file in the page
// cache and the device memory already touched (one untimed load first) for
// both:
//
//   - two-copy: the path before WriteFrom, kept as the baseline
//     (writeFromOn false): each chunk is read from the file's mapping into
//     the registry's 16 MiB buffer, then the arena's Write copies it into
//     the backend's staging buffer and uploads it from there.
//   - one-copy: the arena's WriteFrom: each chunk is read from the mapping
//     straight into the staging buffer and uploaded from there.
//
// Each reports MB/s; one-copy also reports speedup, the two-copy time over
// the one-copy time. cuda-sim's staging buffer is ordinary memory (pinned
// only in the cuda build) and its upload is a copy into a memfd slab, so
// the ratio measures the host copy saved, not PCIe.
//
//	go test -run '^$' -bench '^BenchmarkDeviceLoad$' -benchtime 3x ./host/registry
func BenchmarkDeviceLoad(b *testing.B) {
	path, size := writeBenchCheckpoint(b, b.TempDir(), benchMiB(b, "ARENAHOST_BENCH_DEVICE_LOAD_MIB", benchDeviceLoadMiB))
	capacity := uint64(size) + 128<<20
	var perOp [3]time.Duration // two-copy, one-copy, one-copy without the load CRC
	load := func(b *testing.B, oneCopy, crc bool) {
		defer func(on, c bool) { writeFromOn, loadCRCOn = on, c }(writeFromOn, loadCRCOn)
		writeFromOn, loadCRCOn = oneCopy, crc
		d := gpusim.NewCapacity(0, capacity)
		defer d.Close()
		a, _, err := cuda.NewArenaNamed(b.Context(), "cuda-sim", d, arena.Config{Capacity: capacity, Logger: quiet()})
		if err != nil {
			b.Fatal(err)
		}
		defer a.Close()
		reg := New(a, quiet())
		once := func() {
			if _, err := reg.Load(b.Context(), "bench", path); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := reg.Unload("bench"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		once() // slabs made and touched, staging buffer grown
		b.SetBytes(size)
		b.ResetTimer()
		for range b.N {
			once()
		}
		b.StopTimer() // closing the arena and the device is not loading
		i := map[[2]bool]int{{false, true}: 0, {true, true}: 1, {true, false}: 2}[[2]bool{oneCopy, crc}]
		perOp[i] = b.Elapsed() / time.Duration(b.N)
		if i == 1 && perOp[0] > 0 {
			b.ReportMetric(perOp[0].Seconds()/perOp[1].Seconds(), "speedup")
		}
	}
	b.Run("two-copy", func(b *testing.B) { load(b, false, true) })
	b.Run("one-copy-no-crc", func(b *testing.B) { load(b, true, false) })
	b.Run("one-copy", func(b *testing.B) { load(b, true, true) })
	if perOp[0] > 0 && perOp[1] > 0 {
		mbs := func(d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }
		fmt.Printf("BenchmarkDeviceLoad: %.0f MiB checkpoint into cuda-sim: two-copy %.0f MB/s (%v), one-copy %.0f MB/s (%v), speedup %.2f; one-copy without the load CRC %.0f MB/s (%v)\n",
			float64(size)/(1<<20), mbs(perOp[0]), perOp[0].Round(time.Millisecond), mbs(perOp[1]), perOp[1].Round(time.Millisecond),
			perOp[0].Seconds()/perOp[1].Seconds(), mbs(perOp[2]), perOp[2].Round(time.Millisecond))
	}
}
