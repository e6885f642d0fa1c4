// Package testenv owns how tests find the tools the Makefile provides: the
// Python interpreters of the pinned virtual environments and the built
// binaries. A test that needs one calls these helpers; when the Makefile runs
// the tests (ARENAHOST_REQUIRE_PYTHON=1) a missing tool fails the test
// instead of skipping it, so CI can never pass by skipping. GoBinary builds
// Go binaries through sdk/plugintest/gobuild, the one cache sdk/plugintest
// also builds plugins with: each package once per test binary, into one
// temporary directory that Main removes when the tests end.
package testenv

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/sdk/plugintest/gobuild"
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

// builds says whether Main runs the tests (and so removes the builds).
var builds struct {
	mu   sync.Mutex
	main bool
}

// Main runs the package's tests, then the cleanup functions, then removes
// every binary GoBinary built. A package whose tests call GoBinary
// (directly or through InstallPlugin) must have
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
func Main(m *testing.M, cleanup ...func()) {
	builds.mu.Lock()
	builds.main = true
	builds.mu.Unlock()
	code := m.Run()
	for _, f := range cleanup {
		f()
	}
	gobuild.Clean()
	os.Exit(code)
}

// GoBinary builds the main package pkg (an import path, or a path relative
// to the repository root such as "./plugins/preview") once per test binary
// and returns the executable. Later calls with the same pkg return the same
// file: do not modify it (InstallPlugin copies it). The test fails if the
// build does, or if the package's TestMain does not call Main (nothing
// would remove the binaries).
func GoBinary(tb testing.TB, pkg string) string {
	tb.Helper()
	builds.mu.Lock()
	main := builds.main
	builds.mu.Unlock()
	if !main {
		tb.Fatalf("testenv.GoBinary(%q): this package has no TestMain calling testenv.Main, which removes the builds", pkg)
	}
	dir := ""
	if strings.HasPrefix(pkg, ".") {
		dir = RepoRoot(tb)
	}
	return gobuild.Binary(tb, dir, pkg, "")
}

// InstallPlugin puts a copy of pkg's binary (built once by GoBinary) into
// pluginsDir/name/name with the given manifest (plugin.json), as `make
// build` lays plugins out, and returns the plugin's directory. A copy, so a
// test may replace or touch the installed file.
func InstallPlugin(tb testing.TB, pluginsDir, name, pkg, manifest string) string {
	tb.Helper()
	bin := GoBinary(tb, pkg)
	dir := filepath.Join(pluginsDir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := CopyFile(bin, filepath.Join(dir, name), 0o755); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "plugin.json"), []byte(manifest), 0o644); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// CopyFile copies src to dst with mode perm.
func CopyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
