package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

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
