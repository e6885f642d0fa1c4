// Package testenv owns how tests find the tools the Makefile provides: the
// Python interpreters of the pinned virtual environments and the built
// binaries. A test that needs one calls these helpers; when the Makefile runs
// the tests (ARENAHOST_REQUIRE_PYTHON=1) a missing tool fails the test
// instead of skipping it, so CI can never pass by skipping.
package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// required reports whether missing tools must fail tests rather than skip them.
func required() bool { return os.Getenv("ARENAHOST_REQUIRE_PYTHON") == "1" }

func need(tb testing.TB, env, what string) string {
	tb.Helper()
	p := os.Getenv(env)
	if p == "" {
		// Fall back to the repository's default location.
		p = filepath.Join(RepoRoot(tb), defaults[env])
	}
	if _, err := os.Stat(p); err != nil {
		if required() {
			tb.Fatalf("%s not found at %s (%s): run the tests through `make test`", what, p, env)
		}
		tb.Skipf("%s not found at %s; set %s or run `make test`", what, p, env)
	}
	return p
}

var defaults = map[string]string{
	"ARENAHOST_PYTHON":       ".venv/bin/python",
	"ARENAHOST_TORCH_PYTHON": ".venv-torch/bin/python",
	"ARENAHOST_BIN":          "bin",
}

// Python returns the core environment's interpreter (grpcio, numpy, msgpack,
// safetensors; no torch).
func Python(tb testing.TB) string { return need(tb, "ARENAHOST_PYTHON", "core Python environment") }

// TorchPython returns the oracle environment's interpreter (torch,
// bitsandbytes, diffusers, peft).
func TorchPython(tb testing.TB) string {
	return need(tb, "ARENAHOST_TORCH_PYTHON", "torch Python environment")
}

// BinDir returns the directory `make build` writes binaries to.
func BinDir(tb testing.TB) string { return need(tb, "ARENAHOST_BIN", "built binaries") }

// RepoRoot returns the repository root, found from this source file.
func RepoRoot(tb testing.TB) string {
	tb.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("testenv: cannot locate source file")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// RunPython runs a Python script with the given interpreter and returns its
// combined output, failing the test with that output on error.
func RunPython(tb testing.TB, python string, args ...string) []byte {
	tb.Helper()
	cmd := exec.Command(python, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %v: %v\n%s", python, args, err, out)
	}
	return out
}
