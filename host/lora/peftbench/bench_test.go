package peftbench

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

// slice is the benchmark model: FLUX.1 widths, 1 double + 2 single blocks.
func slice() layout.FluxConfig {
	c := layout.FluxDev()
	c.DoubleBlocks, c.SingleBlocks = 1, 2
	return c
}

const nLoRAs = 5

// fixtures writes (once, cached) the model and the LoRAs.
func fixtures(b *testing.B) (model string, loras []string) {
	b.Helper()
	cfg, tag := slice(), "flux-slice"
	if os.Getenv("ARENAHOST_BENCH_SMALL") == "1" {
		cfg, tag = layout.FluxSample(), "flux-sample"
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "arenahost-bench-lora", tag)
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
	for i := 0; i < nLoRAs; i++ {
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

func buildPlugin(b *testing.B) string {
	b.Helper()
	dir := b.TempDir()
	pd := filepath.Join(dir, "lora-nf4")
	if err := os.MkdirAll(pd, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := testenv.CopyFile(testenv.GoBinary(b, "./plugins/lora-nf4"), filepath.Join(pd, "lora-nf4"), 0o755); err != nil {
		b.Fatal(err)
	}
	man, err := os.ReadFile(filepath.Join(testenv.RepoRoot(b), "plugins", "lora-nf4", "plugin.json"))
	if err == nil {
		err = os.WriteFile(filepath.Join(pd, "plugin.json"), man, 0o644)
	}
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

// rssAnon reads a process's private resident memory (RssAnon): shared
// arena pages, which both processes map, are not extra memory and are
// counted once, through the arena's own figure.
func rssAnon(pid string) int64 {
	raw, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n * 1024
			}
		}
	}
	return 0
}

// measure times fn and returns the peak memory it added: private resident
// memory of the host (this process) and the plugin, and arena bytes
// allocated (journal, factors), each sampled every 2 ms.
func measure(b *testing.B, s *server.Server, pids []string, fn func() error) (took time.Duration, anon, arenaBytes int64) {
	b.Helper()
	sample := func() (int64, int64) {
		var n int64
		for _, p := range pids {
			n += rssAnon(p)
		}
		return n, int64(s.Arena.Stats().Allocated)
	}
	an0, ar0 := sample()
	pa, pr := an0, ar0
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				a, r := sample()
				pa, pr = max(pa, a), max(pr, r)
			}
		}
	}()
	start := time.Now()
	err := fn()
	took = time.Since(start)
	close(stop)
	<-done
	a, r := sample()
	pa, pr = max(pa, a), max(pr, r)
	if err != nil {
		b.Fatal(err)
	}
	return took, pa - an0, pr - ar0
}

func digest(b *testing.B, s *server.Server, model string) [32]byte {
	b.Helper()
	h := sha256.New()
	m, _ := s.Registry.Model(model)
	for _, w := range m.Weights {
		for _, t := range []*registry.Tensor{w.Packed, w.Absmax} {
			_ = s.Registry.View(model, t.Name, func(_ *registry.Tensor, bs []byte) error { h.Write(bs); return nil })
		}
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

type figure struct {
	Seconds   float64 `json:"seconds"`
	PeakExtra int64   `json:"peak_extra_bytes"` // everything the operation added at its peak
	Scratch   int64   `json:"-"`                // ours: private memory only (journal excluded)
	ByteExact *bool   `json:"byte_exact,omitempty"`
}

func BenchmarkLoRAvsPEFT(b *testing.B) {
	python := testenv.TorchPython(b)
	model, loras := fixtures(b)
	plugins := buildPlugin(b)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	for i := 0; i < b.N; i++ {
		s, err := server.New(ctx, server.Config{DataDir: b.TempDir(), PluginsDir: plugins, ArenaCapacity: 8 << 30, Logger: log})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Registry.Load(ctx, "bench", model); err != nil {
			b.Fatal(err)
		}
		st, err := s.Plugins.PluginStatus(lora.PluginName)
		if err != nil {
			b.Fatal(err)
		}
		pids := []string{strconv.Itoa(os.Getpid()), strconv.Itoa(st.PID)}
		orig := digest(b, s, "bench")
		set := func(n int) []api.AppliedLoRA {
			var es []api.AppliedLoRA
			for _, p := range loras[:n] {
				es = append(es, api.AppliedLoRA{Path: p, Strength: 1})
			}
			return es
		}
		ours := map[string]figure{}
		var journal, journalFile arena.ByteSize
		for _, n := range []int{1, nLoRAs} {
			t, an, ar := measure(b, s, pids, func() error {
				r, err := s.LoRAs.Apply(ctx, lora.Request{Model: "bench", LoRAs: set(n), Mode: lora.ModeFuse})
				if err == nil {
					journal, journalFile = arena.ByteSize(r.JournalBytes), arena.ByteSize(r.JournalFileBytes)
				}
				return err
			})
			ours[fmt.Sprintf("fuse%d", n)] = figure{Seconds: t.Seconds(), PeakExtra: an + ar, Scratch: an}
			t, an, ar = measure(b, s, pids, func() error { _, err := s.LoRAs.Remove(ctx, "bench"); return err })
			exact := digest(b, s, "bench") == orig
			ours[fmt.Sprintf("remove%d", n)] = figure{Seconds: t.Seconds(), PeakExtra: an + max(ar, 0), Scratch: an, ByteExact: &exact}
		}
		t, an, ar := measure(b, s, pids, func() error {
			_, err := s.LoRAs.Apply(ctx, lora.Request{Model: "bench", LoRAs: set(nLoRAs), Mode: lora.ModeSide})
			return err
		})
		ours["side5"] = figure{Seconds: t.Seconds(), PeakExtra: an + ar, Scratch: an}
		if _, err := s.LoRAs.Remove(ctx, "bench"); err != nil {
			b.Fatal(err)
		}
		_ = s.Close(ctx)

		// The baseline runs in the same benchmark run; its figures are also
		// kept next to the model, and ARENAHOST_BENCH_REUSE_BASELINE=1 reuses
		// them (it takes minutes on a small machine) while iterating on ours.
		saved := filepath.Join(filepath.Dir(model), "baseline.json")
		raw, err := os.ReadFile(saved)
		if os.Getenv("ARENAHOST_BENCH_REUSE_BASELINE") != "1" || err != nil {
			script := filepath.Join(testenv.RepoRoot(b), "bench", "lora", "peft_baseline.py")
			cmd := exec.Command(python, append([]string{script, model}, append(loras, "--sets", fmt.Sprintf("1,%d", nLoRAs))...)...)
			cmd.Stderr = os.Stderr
			if raw, err = cmd.Output(); err != nil {
				b.Fatalf("baseline: %v", err)
			}
			_ = os.WriteFile(saved, raw, 0o644)
		} else {
			fmt.Printf("baseline figures reused from %s\n", saved)
		}
		base := map[string]figure{}
		if err := json.Unmarshal(raw, &base); err != nil {
			b.Fatalf("baseline output %q: %v", raw, err)
		}
		report(b, ours, base, journal, journalFile)
	}
}

func report(b *testing.B, ours, base map[string]figure, journal, journalFile arena.ByteSize) {
	mib := func(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }
	row := func(name, ourKey, baseKey string) {
		o, p := ours[ourKey], base[baseKey]
		speed := p.Seconds / o.Seconds
		mem := float64(o.PeakExtra) / float64(max(p.PeakExtra, 1))
		scratch := float64(o.Scratch) / float64(max(p.PeakExtra, 1))
		exact := ""
		if o.ByteExact != nil {
			exact = fmt.Sprintf("  byte-exact ours=%v baseline=%v", *o.ByteExact, p.ByteExact != nil && *p.ByteExact)
		}
		fmt.Printf("%-8s ours %8.3f s %9s (scratch %9s) | PEFT+bnb %8.3f s %9s | %7.1fx faster, memory %.3f of baseline (scratch %.3f)%s\n",
			name, o.Seconds, mib(o.PeakExtra), mib(o.Scratch), p.Seconds, mib(p.PeakExtra), speed, mem, scratch, exact)
		b.ReportMetric(o.Seconds, name+"-s")
		b.ReportMetric(speed, name+"-speedup")
	}
	fmt.Printf("LoRA on NF4 Flux slice: time and peak extra memory (ours: private RSS of host and plugin plus arena bytes allocated, journal included; scratch: private RSS only; PEFT: its process RSS); fuse journal %s in the arena, %s referenced in the model file\n", journal, journalFile)
	row("fuse1", "fuse1", "fuse1")
	row("fuse5", "fuse5", "fuse5")
	row("side5", "side5", "fuse5")
	row("remove1", "remove1", "unfuse1")
	row("remove5", "remove5", "unfuse5")
}

func TestMain(m *testing.M) { testenv.Main(m) }
