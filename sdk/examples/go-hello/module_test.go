package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/plugintest"
)

// An author outside this repository builds a plugin in a module of their
// own that requires github.com/arenahost/arenahost with a replace directive
// pointing at a checkout (sdk/examples/README.md): this copies the example
// into such a module in a temporary directory, builds it there with the
// go command (no network: the requirements are this module's, from the
// module cache) and runs the conformance suite on the binary it built.
func TestBuildsAsAnOutOfTreeModule(t *testing.T) {
	root := testenv.RepoRoot(t)
	dir := t.TempDir()
	for _, f := range []string{"main.go", "plugin.json"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rootMod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	// The requirement blocks stand in for what `go mod tidy` would write
	// with network access.
	reqs := regexp.MustCompile(`(?s)require .*`).Find(rootMod)
	mod := "module example.com/go-hello\n\ngo 1.26.8\n\nrequire github.com/arenahost/arenahost v0.0.0\n\n" +
		"replace github.com/arenahost/arenahost => " + root + "\n\n" + string(reqs)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(mod), 0o644); err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.sum"), sum, 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "go-hello")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOPROXY=off", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build in a module outside the repository: %v\n%s\ngo.mod:\n%s", err, out, mod)
	}
	plugintest.Run(t, plugintest.Config{Cmd: []string{bin}, WantName: "go-hello", WantKind: "other"})
}
