package registry

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/shared/safetensors"
)

// benchShardMiB is the size of BenchmarkLoadSharded's checkpoint; override
// it with ARENAHOST_BENCH_SHARD_MIB.
const benchShardMiB = 512

var shardBytes int64 = 64 << 20

// BenchmarkLoadSharded compares loading one checkpoint (Flux-sized nf4
// weights, as BenchmarkLoad) from a single file and from a diffusers model
// folder holding the same tensors in 64 MiB shards with their index, in
// the same run, both with the files in the page cache. It prints both
// throughputs and the sharded/single time ratio.
//
//	go test -run '^$' -bench '^BenchmarkLoadSharded$' -benchtime 3x ./host/registry
func BenchmarkLoadSharded(b *testing.B) {
	if v := os.Getenv("ARENAHOST_BENCH_SHARD_BYTES"); v != "" {
		fmt.Sscan(v, &shardBytes)
	}
	dir := b.TempDir()
	single, size := writeBenchCheckpoint(b, dir, benchMiB(b, "ARENAHOST_BENCH_SHARD_MIB", benchShardMiB))
	f, err := safetensors.Open(single)
	if err != nil {
		b.Fatal(err)
	}
	var ts []safetensors.WriteTensor
	for _, t := range f.Tensors {
		d, _ := f.Data(t.Name)
		ts = append(ts, safetensors.WriteTensor{Name: t.Name, DType: t.DType, Shape: t.Shape, Data: d})
	}
	folder := filepath.Join(dir, "folder")
	group := func(n string) string { return strings.SplitN(n, ".weight", 2)[0] }
	if err := mkdir(folder); err != nil {
		b.Fatal(err)
	}
	if err := safetensors.WriteSharded(folder, "diffusion_pytorch_model", f.Metadata, ts, shardBytes, group); err != nil {
		b.Fatal(err)
	}
	f.Close()
	shards, _ := filepath.Glob(filepath.Join(folder, "*-of-*.safetensors"))
	b.Logf("%d shards", len(shards))

	a := newTestArena(b, uint64(size)+(256<<20), 0)
	reg := New(a, quiet())
	ctx := context.Background()
	load := func(b *testing.B, path string) time.Duration {
		start := time.Now()
		if _, err := reg.Load(ctx, "bench", path); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		if err := reg.Unload("bench"); err != nil {
			b.Fatal(err)
		}
		return d
	}
	// Both into the page cache first; then each iteration loads the one
	// file and the folder back to back, in alternating order, so the
	// machine's drift (other processes, cache state) falls on both alike.
	load(b, single)
	load(b, folder)
	times := map[string]time.Duration{}
	b.Run("interleaved", func(b *testing.B) {
		b.SetBytes(2 * size)
		var s, h time.Duration
		for i := 0; i < b.N; i++ {
			// Which goes first alternates: a load right after an unload
			// shares the machine with the kernel freeing the last one's
			// arena pages.
			if i%2 == 0 {
				s += load(b, single)
				h += load(b, folder)
			} else {
				h += load(b, folder)
				s += load(b, single)
			}
		}
		times["single"], times["sharded"] = s/time.Duration(b.N), h/time.Duration(b.N)
	})
	if s, h := times["single"], times["sharded"]; s > 0 && h > 0 {
		mibs := func(d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }
		fmt.Printf("BenchmarkLoadSharded: %.0f MiB checkpoint: one file %.0f MiB/s (%v), %d shards + index %.0f MiB/s (%v), sharded/single time ratio %.2f\n",
			float64(size)/(1<<20), mibs(s), s.Round(time.Millisecond), len(shards), mibs(h), h.Round(time.Millisecond), h.Seconds()/s.Seconds())
	}
}

func mkdir(p string) error { return os.MkdirAll(p, 0o755) }
