package plugintest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Binary is a Go plugin compiled once per test binary, as `make build`
// compiles it, so every test of a plugin package starts the real process.
//
//	var bin = plugintest.NewBinary(".", "preview")
//
//	func TestMain(m *testing.M) { code := m.Run(); bin.Remove(); os.Exit(code) }
//	func TestConformance(t *testing.T) {
//		plugintest.Run(t, plugintest.Config{Cmd: []string{bin.Path(t)}})
//	}
type Binary struct {
	pkg, name string

	once sync.Once
	dir  string
	err  error
}

// NewBinary describes the plugin in package pkg (a `go build` package
// argument; "." for the package under test), written as name.
func NewBinary(pkg, name string) *Binary { return &Binary{pkg: pkg, name: name} }

// Path builds the plugin on first use and returns the binary's path; a
// failed build fails tb with the compiler's output.
func (b *Binary) Path(tb testing.TB) string {
	tb.Helper()
	b.once.Do(func() {
		if b.dir, b.err = os.MkdirTemp("", "plugintest-"+b.name); b.err != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", filepath.Join(b.dir, b.name), b.pkg).CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
		}
	})
	if b.err != nil {
		tb.Fatal(b.err)
	}
	return filepath.Join(b.dir, b.name)
}

// Remove deletes the built binary (call it from TestMain after m.Run).
func (b *Binary) Remove() {
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}
