package gpu

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestPTXEntries checks the committed PTX against the launch code: every
// kernel is present with the expected number of parameters, all 8 bytes
// (gorgonia.org/cu copies each launch parameter as 8 bytes), for compute_80.
func TestPTXEntries(t *testing.T) {
	got, err := PTXEntries(PTX)
	if err != nil {
		t.Fatal(err)
	}
	for name, n := range Entries {
		sizes, ok := got[name]
		if !ok {
			t.Errorf("kernel %s missing from the PTX", name)
			continue
		}
		if len(sizes) != n {
			t.Errorf("kernel %s: %d parameters in the PTX, launch code passes %d", name, len(sizes), n)
		}
		if i := slices.IndexFunc(sizes, func(s int) bool { return s != 8 }); i >= 0 {
			t.Errorf("kernel %s: parameter %d is %d bytes, want 8", name, i, sizes[i])
		}
	}
	if len(got) != len(Entries) {
		t.Errorf("PTX has %d entries, launch code knows %d", len(got), len(Entries))
	}
	if !containsLine(PTX, ".target sm_80") {
		t.Error("PTX is not compiled for compute_80 (.target sm_80)")
	}
	if !containsLine(PTX, ".version 7.0") {
		t.Error("PTX ISA is not 7.0: drivers older than the NVRTC that made it would refuse to JIT it")
	}
}

// TestPTXMatchesSource guards against a kernels.cu edit without `make ptx`:
// every extern "C" kernel in the source is an entry of the PTX.
func TestPTXMatchesSource(t *testing.T) {
	src, err := os.ReadFile("kernels/kernels.cu")
	if err != nil {
		t.Fatal(err)
	}
	got, err := PTXEntries(PTX)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range kernelNames(string(src)) {
		n++
		if _, ok := got[name]; !ok {
			t.Errorf("kernels.cu defines %s but kernels.ptx lacks it: run make ptx", name)
		}
	}
	if n != len(got) {
		t.Errorf("kernels.cu has %d kernels, kernels.ptx %d: run make ptx", n, len(got))
	}
}

func TestPTXEntriesErrors(t *testing.T) {
	for _, bad := range []string{"", ".visible .entry k(\n\t.param .u16 x\n)", ".visible .entry k(\n\t.reg x\n)"} {
		if _, err := PTXEntries(bad); err == nil {
			t.Errorf("PTXEntries(%q) accepted", bad)
		}
	}
}

// TestPTXIsCurrent: the committed PTX was generated from the committed
// kernels.cu (build_ptx.py writes the source's sha256 in its first line).
func TestPTXIsCurrent(t *testing.T) {
	src, err := os.ReadFile("kernels/kernels.cu")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(src)
	first, _, _ := strings.Cut(PTX, "\n")
	if !strings.Contains(first, "sha256:"+hex.EncodeToString(sum[:])) {
		t.Fatalf("kernels.ptx is stale (first line %q): run make ptx", first)
	}
}
