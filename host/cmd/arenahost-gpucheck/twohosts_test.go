package main

import (
	"strings"
	"testing"
)

// TestTwoHostsOnSimulatedDevices runs the GPU check's two-host step here on
// cuda-sim devices 0 and 1: the same real hosts, plugin processes and HTTP
// calls a machine with two GPUs runs with --arena-backend cuda.
func TestTwoHostsOnSimulatedDevices(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two hosts")
	}
	bin := buildHost(t)
	r := &Report{Device: "simulated devices"}
	err := CheckTwoHosts(t.Context(), r, TwoHostOptions{Bin: bin, Backend: "cuda-sim", Devices: [2]int{0, 1}})
	t.Log("\n" + r.Table())
	if err != nil {
		t.Fatal(err)
	}
	if r.Failed() > 0 || len(r.Rows) != 3 {
		t.Fatalf("%d of %d checks failed", r.Failed(), len(r.Rows))
	}
	if notes := strings.Join(r.Notes, "\n"); strings.Count(notes, `"cuda-sim`) != 2 {
		t.Errorf("the hosts did not both report the simulated backend: %v", r.Notes)
	}
}
