package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

// TestTorchBaselineRunsOnCPU runs the Python side's PyTorch merge baseline
// on the CPU (ARENAHOST_TORCH_DEVICE=cpu) over two small odd layers, so the
// script a GPU machine runs is exercised here too.
func TestTorchBaselineRunsOnCPU(t *testing.T) {
	py := testenv.TorchPython(t)
	req := `{"rank": 4, "loras": 2, "blocksize": 64, "layers": [[37, 77], [64, 128]]}`
	cmd := exec.Command(py, "torch_check.py", "merge", req)
	cmd.Env = append(cmd.Environ(), "ARENAHOST_TORCH_DEVICE=cpu")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("torch_check.py merge: %v\n%s", err, out)
	}
	var res struct {
		Seconds float64 `json:"seconds"`
		Layers  int     `json:"layers"`
		Torch   string  `json:"torch"`
	}
	if err := json.Unmarshal([]byte(lastLine(string(out))), &res); err != nil {
		t.Fatalf("output %q: %v", out, err)
	}
	if res.Layers != 2 || res.Seconds <= 0 || res.Torch == "" {
		t.Fatalf("result %+v", res)
	}
}

// TestTorchCheckImportsSDK: the ipc mode imports arenahost.cuda from the
// repository without the SDK's package __init__ (no grpc needed).
func TestTorchCheckImportsSDK(t *testing.T) {
	py := testenv.TorchPython(t)
	script := `
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tc", "torch_check.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
c = m.sdk_cuda()
print(c.HANDLE_SIZE, "grpc" in sys.modules, c.__file__)
`
	cmd := exec.Command(py, "-c", script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	f := strings.Fields(lastLine(string(out)))
	want := filepath.Join(testenv.RepoRoot(t), "sdk", "python", "arenahost", "cuda.py")
	if len(f) != 3 || f[0] != "64" || f[1] != "False" || f[2] != want {
		t.Fatalf("got %q, want 64 False %s", out, want)
	}
}
