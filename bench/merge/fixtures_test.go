// Package mergebench compares `arenahost merge --as nf4` with a NumPy/OpenBLAS
// implementation of the same dequantize → add Σ s·B·A → requantize
// (baseline.py), on the same files in the same run, and the fused pass's
// delta phase with the machine's fp32 SGEMM throughput measured in that
// run. Run it with
//
//	ARENAHOST_PYTHON=.venv/bin/python go test ./bench/merge -run '^$' -bench . -benchtime 1x -timeout 30m
//
// (make bench sets the interpreter). ARENAHOST_BENCH_ROUNDS sets the runs
// per figure (default 2, best kept, all printed); ARENAHOST_BENCH_SMALL=1
// uses the small sample model for a quick check.
package mergebench

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/samples"
)

// block is the benchmark model: FLUX.1 widths, one double block (the
// issue's 340M-parameter Flux-width block) and nothing else but the small
// embedding and final layers every Flux checkpoint has.
func block() layout.FluxConfig {
	c := layout.FluxDev()
	c.DoubleBlocks, c.SingleBlocks = 1, 0
	return c
}

const nLoRAs = 5

// fixtures writes (once, cached under the user cache directory) the plain
// NF4 model, blocksize 64, bfloat16, and five rank-16 kohya LoRAs on every
// block Linear.
func fixtures(b *testing.B) (model string, loras []string) {
	b.Helper()
	cfg, tag := block(), "flux-double-block"
	if os.Getenv("ARENAHOST_BENCH_SMALL") == "1" {
		cfg, tag = layout.FluxSample(), "flux-sample"
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "arenahost-bench-merge", tag)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	model = filepath.Join(dir, "model-nf4.safetensors")
	if _, err := os.Stat(model); err != nil {
		start := time.Now()
		tmp := model + ".tmp"
		if err := samples.WriteModel(tmp, samples.ModelOptions{Config: cfg, Seed: 1}); err != nil {
			b.Fatal(err)
		}
		if err := os.Rename(tmp, model); err != nil {
			b.Fatal(err)
		}
		b.Logf("wrote %s in %s", model, time.Since(start).Round(time.Millisecond))
	}
	for i := 0; i < nLoRAs; i++ {
		p := filepath.Join(dir, fmt.Sprintf("kohya-r16-%d.safetensors", i))
		if _, err := os.Stat(p); err != nil {
			tmp := p + ".tmp"
			if err := samples.WriteKohyaLoRA(tmp, samples.LoRAOptions{Config: cfg, Rank: 16, Alpha: 16, Seed: uint64(100 + i)}); err != nil {
				b.Fatal(err)
			}
			if err := os.Rename(tmp, p); err != nil {
				b.Fatal(err)
			}
		}
		loras = append(loras, p)
	}
	return model, loras
}
