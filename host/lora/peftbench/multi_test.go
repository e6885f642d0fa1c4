package peftbench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

// multiSlice is BenchmarkMultiLoRA's model: FLUX.1-dev widths with 2
// double and 4 single blocks (about 1.25 B parameters, 0.7 GB of NF4, a
// tenth of Flux-dev), small enough for a CPU machine's page cache twice
// over. ARENAHOST_BENCH_MULTI_BLOCKS=D,S picks other block counts.
func multiSlice(b *testing.B) (layout.FluxConfig, string) {
	c := layout.FluxDev()
	c.DoubleBlocks, c.SingleBlocks = 2, 4
	if v := os.Getenv("ARENAHOST_BENCH_MULTI_BLOCKS"); v != "" {
		if _, err := fmt.Sscanf(v, "%d,%d", &c.DoubleBlocks, &c.SingleBlocks); err != nil {
			b.Fatalf("ARENAHOST_BENCH_MULTI_BLOCKS=%q: want D,S", v)
		}
	}
	return c, fmt.Sprintf("flux-dev-%dd%ds", c.DoubleBlocks, c.SingleBlocks)
}

// multiFixtures writes (once, cached under the user cache directory) the
// slice and five rank-16 kohya LoRAs on it.
func multiFixtures(b *testing.B) (model string, loras []string) {
	b.Helper()
	cfg, tag := multiSlice(b)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "arenahost-bench-multilora", tag)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	model = filepath.Join(dir, "model-nf4.safetensors")
	if _, err := os.Stat(model); err != nil {
		start := time.Now()
		if err := samples.WriteModel(model, samples.ModelOptions{Config: cfg, Seed: 1}); err != nil {
			b.Fatal(err)
		}
		b.Logf("wrote %s in %s", model, time.Since(start).Round(time.Millisecond))
	}
	for i := range nLoRAs {
		p := filepath.Join(dir, fmt.Sprintf("kohya-r16-%d.safetensors", i))
		if _, err := os.Stat(p); err != nil {
			if err := samples.WriteKohyaLoRA(p, samples.LoRAOptions{Config: cfg, Rank: 16, Alpha: 16, Seed: uint64(100 + i)}); err != nil {
				b.Fatal(err)
			}
		}
		loras = append(loras, p)
	}
	return model, loras
}

// multiFigures are one configuration's end-to-end times (the coordinator's
// Apply/Remove, from the call to ready), best of the rounds.
type multiFigures struct {
	side5, fuse5, refuse5, remove5 time.Duration
	side5BF16                      time.Duration // the side apply with factor_dtype bf16
	sideBytes, sideBytesBF16       int64
	restore                        time.Duration // the re-apply's "host: journal and restore" phase
	exact                          bool
	journalMem                     uint64
}

// runMulti loads the slice into a fresh host whose plugin parses with
// workers goroutines and whose journal keeps journalMem bytes of originals
// in memory (0: none), and times rounds of: a side apply of the five
// LoRAs, remove, a fused apply of the five, a fused re-apply of the five
// at other strengths (restore, then fuse), remove (byte-exact checked).
func runMulti(b *testing.B, plugins, model string, loras []string, workers int, journalMem, journalArena int64, rounds int) multiFigures {
	b.Helper()
	b.Setenv("LORA_NF4_PARSE_WORKERS", strconv.Itoa(workers))
	ctx := context.Background()
	s, err := server.New(ctx, server.Config{DataDir: b.TempDir(), PluginsDir: plugins, ArenaCapacity: 16 << 30,
		LoRAJournalMemory: journalMem, LoRAJournalArena: journalArena, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close(ctx)
	if _, err := s.Registry.Load(ctx, "bench", model); err != nil {
		b.Fatal(err)
	}
	orig := digest(b, s, "bench")
	set := func(strength float64) []api.AppliedLoRA {
		var es []api.AppliedLoRA
		for _, p := range loras {
			es = append(es, api.AppliedLoRA{Path: p, Strength: strength})
		}
		return es
	}
	timeIt := func(best *time.Duration, fn func() (*api.LoRAResult, error)) *api.LoRAResult {
		t0 := time.Now()
		r, err := fn()
		if err != nil {
			b.Fatal(err)
		}
		if d := time.Since(t0); *best == 0 || d < *best {
			*best = d
		}
		return r
	}
	var f multiFigures
	f.exact = true
	for range rounds {
		for _, fdt := range []string{lora.FactorF32, lora.FactorBF16} {
			best, bytes := &f.side5, &f.sideBytes
			if fdt == lora.FactorBF16 {
				best, bytes = &f.side5BF16, &f.sideBytesBF16
			}
			r := timeIt(best, func() (*api.LoRAResult, error) {
				return s.LoRAs.Apply(ctx, lora.Request{Model: "bench", LoRAs: set(1), Mode: lora.ModeSide, FactorDType: fdt})
			})
			*bytes = r.Report.SideBytes
			if _, err := s.LoRAs.Remove(ctx, "bench"); err != nil {
				b.Fatal(err)
			}
		}
		timeIt(&f.fuse5, func() (*api.LoRAResult, error) {
			return s.LoRAs.Apply(ctx, lora.Request{Model: "bench", LoRAs: set(1), Mode: lora.ModeFuse})
		})
		// The journal's host-memory copy is taken in the background after
		// the first fused apply; a user re-applies seconds later.
		if err := s.LoRAs.WaitJournalCopies(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		r := timeIt(&f.refuse5, func() (*api.LoRAResult, error) {
			return s.LoRAs.Apply(ctx, lora.Request{Model: "bench", LoRAs: set(0.8), Mode: lora.ModeFuse})
		})
		f.journalMem = r.JournalMemoryBytes + r.JournalBytes
		if r.Report != nil {
			for _, ph := range r.Report.Phases {
				if ph.Name == "host: journal and restore" && (f.restore == 0 || ph.Elapsed < f.restore) {
					f.restore = ph.Elapsed
				}
			}
		}
		timeIt(&f.remove5, func() (*api.LoRAResult, error) { return s.LoRAs.Remove(ctx, "bench") })
		f.exact = f.exact && digest(b, s, "bench") == orig
	}
	return f
}

// BenchmarkMultiLoRA times five rank-16 LoRAs on a Flux-dev-width slice,
// end to end through the real plugin: side apply, fused apply, fused
// re-apply and remove, for today's path as the baseline (files parsed one
// after another, the journal restored from the model file) and ours (files
// parsed concurrently, the journal restored from its copy in host memory,
// or in the arena with lora-journal-arena), in the same run, and prints
// the ratios.
func BenchmarkMultiLoRA(b *testing.B) {
	model, loras := multiFixtures(b)
	plugins := buildPlugin(b)
	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("ARENAHOST_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	for i := 0; i < b.N; i++ {
		base := runMulti(b, plugins, model, loras, 1, -1, 0, rounds)
		ours := runMulti(b, plugins, model, loras, 0, 0, 0, rounds)         // 0 workers: GOMAXPROCS; host-memory copy
		inArena := runMulti(b, plugins, model, loras, 0, -1, 1<<40, rounds) // the copy in the arena instead
		fi, _ := os.Stat(model)
		cfg, tag := multiSlice(b)
		fmt.Printf("5 rank-16 LoRAs on %s (%d double + %d single blocks, %.0f MiB NF4), best of %d rounds, end to end from the page cache\n",
			tag, cfg.DoubleBlocks, cfg.SingleBlocks, float64(fi.Size())/(1<<20), rounds)
		fmt.Printf("journal originals copied: %.0f MiB in host memory (ours), %.0f MiB in the arena (ours, arena copy)\n",
			float64(ours.journalMem)/(1<<20), float64(inArena.journalMem)/(1<<20))
		row := func(name string, o, a, p time.Duration) {
			fmt.Printf("%-9s ours %8.3f s (%5.2fx) | ours, arena copy %8.3f s (%5.2fx) | baseline %8.3f s\n",
				name, o.Seconds(), p.Seconds()/o.Seconds(), a.Seconds(), p.Seconds()/a.Seconds(), p.Seconds())
			b.ReportMetric(o.Seconds(), name+"-s")
			b.ReportMetric(p.Seconds()/o.Seconds(), name+"-speedup")
		}
		row("side5", ours.side5, inArena.side5, base.side5)
		fmt.Printf("side5 with factor_dtype bf16: ours %.3f s, %.0f MiB of factors (f32: %.3f s, %.0f MiB)\n",
			ours.side5BF16.Seconds(), float64(ours.sideBytesBF16)/(1<<20), ours.side5.Seconds(), float64(ours.sideBytes)/(1<<20))
		b.ReportMetric(ours.side5BF16.Seconds(), "side5bf16-s")
		row("fuse5", ours.fuse5, inArena.fuse5, base.fuse5)
		row("refuse5", ours.refuse5, inArena.refuse5, base.refuse5)
		row("(restore)", ours.restore, inArena.restore, base.restore)
		row("remove5", ours.remove5, inArena.remove5, base.remove5)
		fmt.Printf("remove byte-exact: ours %v, arena copy %v, baseline %v\n", ours.exact, inArena.exact, base.exact)
		if !ours.exact || !base.exact || !inArena.exact {
			b.Fatal("remove was not byte-exact")
		}
	}
}
