package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
)

// buildHost builds arenahost and the lora-nf4 plugin laid out as `make
// build` does (bin/arenahost, bin/plugins/lora-nf4/), so that the host's
// --plugins auto finds the plugin.
func buildHost(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bin")
	pd := filepath.Join(bin, "plugins", "lora-nf4")
	if err := os.MkdirAll(pd, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range [][2]string{
		{filepath.Join(bin, "arenahost"), "./host/cmd/arenahost"},
		{filepath.Join(pd, "lora-nf4"), "./plugins/lora-nf4"},
	} {
		if err := testenv.CopyFile(testenv.GoBinary(t, b[1]), b[0], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	man, err := os.ReadFile("../../../plugins/lora-nf4/plugin.json")
	if err == nil {
		err = os.WriteFile(filepath.Join(pd, "plugin.json"), man, 0o644)
	}
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(bin, "arenahost")
}

// TestServedOnSimulatedDevice runs the GPU check's served step here, with
// the simulated device (arena backend cuda-sim) in place of the GPU: the
// same two real hosts and plugin processes, the same HTTP calls and digest
// comparisons a GPU machine makes with --arena-backend cuda.
func TestServedOnSimulatedDevice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two hosts")
	}
	bin := buildHost(t)
	r := &Report{Device: "simulated device"}
	err := CheckServed(t.Context(), r, ServedOptions{CPU: bin, Device: bin, DeviceArgs: []string{"--arena-backend", "cuda-sim"}})
	t.Log("\n" + r.Table())
	if err != nil {
		t.Fatal(err)
	}
	if r.Failed() > 0 || len(r.Rows) < 5 {
		t.Fatalf("%d of %d checks failed", r.Failed(), len(r.Rows))
	}
	if !strings.Contains(strings.Join(r.Notes, "\n"), `"cuda-sim`) {
		t.Errorf("the device host did not report the simulated backend: %v", r.Notes)
	}
}

// TestServedStartFailureNamesHost: a host binary that exits at once fails
// the check at once, naming the host, instead of waiting for it.
func TestServedStartFailureNamesHost(t *testing.T) {
	r := &Report{}
	err := CheckServed(t.Context(), r, ServedOptions{CPU: "/bin/false", Device: "/bin/false"})
	if err == nil || !strings.Contains(err.Error(), "cpu host exited before serving") {
		t.Fatalf("err = %v", err)
	}
}

// TestScaleOnSimulatedDevice runs the GPU check's scale step on the tiny
// Flux with the simulated device: checkpoint and LoRAs written into the
// host's directories, loaded over HTTP, fused with 1 and 5 LoRAs, removed
// byte-exact, side-applied.
func TestScaleOnSimulatedDevice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a host")
	}
	bin := buildHost(t)
	r := &Report{Device: "simulated device"}
	err := CheckScale(t.Context(), r, ScaleOptions{Device: bin, DeviceArgs: []string{"--arena-backend", "cuda-sim"}, Model: "tiny", Rank: 16})
	t.Log("\n" + r.Table())
	if err != nil {
		t.Fatal(err)
	}
	if r.Failed() > 0 || len(r.Rows) < 6 {
		t.Fatalf("%d of %d checks failed", r.Failed(), len(r.Rows))
	}
}

func TestMain(m *testing.M) { testenv.Main(m) }

// buildHostWithPipeline is buildHost with the diffusers-flux pipeline
// plugin beside lora-nf4, as `make build` lays it out.
func buildHostWithPipeline(t *testing.T) string {
	t.Helper()
	bin := buildHost(t)
	src := "../../../sdk/python/examples/diffusers_flux"
	dst := filepath.Join(filepath.Dir(bin), "plugins", "diffusers_flux")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"plugin.json", "diffusers_flux.py"} {
		if err := testenv.CopyFile(filepath.Join(src, f), filepath.Join(dst, f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return bin
}

// TestCapGenOnSimulatedDevice runs the GPU check's capped-generation step
// at tiny scale with the simulated device and torch on the CPU: the same
// fixtures, host, HTTP applies, diffusers-flux jobs and PEFT-on-bnb
// baseline process a GPU machine runs at Flux-dev scale (the caps bind
// nothing on the CPU: the arena's capacity does, torch's cap is reported
// as not applied).
func TestCapGenOnSimulatedDevice(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a host, a Python pipeline and the baseline")
	}
	python := testenv.TorchPython(t)
	bin := buildHostWithPipeline(t)
	root := testenv.RepoRoot(t)
	r := &Report{Device: "simulated device"}
	err := CheckCapGen(t.Context(), r, CapGenOptions{Device: bin, DeviceArgs: []string{"--arena-backend", "cuda-sim"}, TorchDev: "cpu",
		Python: python, Script: filepath.Join(root, "host", "cmd", "arenahost-gpucheck", "capgen.py"), SDK: filepath.Join(root, "sdk", "python"),
		Model: "tiny", Size: 64, Steps: 2, DType: "float32", Tokens: 16, CapsGiB: []float64{24, 12}, LoRAs: []int{0, 3}, Ranks: []int{16, 64},
		Baseline: true, Budget: 10 * time.Minute})
	md := r.Markdown("now", "test")
	t.Log("\n" + md)
	if err != nil {
		t.Fatal(err)
	}
	// 24 GiB: 0 LoRAs, 3 × {16, 64} × {side, fuse}; 12 GiB: 0, 3 × 16 × {side, fuse}; each for arenahost and the baseline.
	var ours, base int
	for _, row := range r.Rows {
		if row.Section != "capgen" {
			continue
		}
		if row.Status == Fail {
			t.Errorf("%s: %s", row.Name, row.Result)
		}
		switch {
		case strings.HasPrefix(row.Name, "arenahost"):
			ours++
		case strings.HasPrefix(row.Name, "baseline"):
			base++
		}
		if !strings.Contains(row.Result, "apply") || strings.Contains(row.Result, "out of memory") {
			t.Errorf("%s: %s", row.Name, row.Result)
		}
	}
	if ours != 8 || base != 8 {
		t.Errorf("%d arenahost and %d baseline rows, want 8 each", ours, base)
	}
	if !strings.Contains(md, "## Capped generation") || !strings.Contains(md, "| arenahost | 24 GiB | 3 | 64 | fuse |") || !strings.Contains(md, "| baseline | 12 GiB | 3 | 16 | unmerged |") {
		t.Errorf("the report has no capgen table")
	}
}
