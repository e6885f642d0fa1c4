package plugintest

import (
	"testing"

	"github.com/arenahost/arenahost/sdk/plugintest/gobuild"
)

// Binary is a Go plugin compiled once per test binary, as `make build`
// compiles it, so every test of a plugin package starts the real process.
// The build goes through gobuild's one cache, which the repository's own
// tests share.
//
//	var bin = plugintest.NewBinary(".", "preview")
//
//	func TestMain(m *testing.M) { code := m.Run(); plugintest.Clean(); os.Exit(code) }
//	func TestConformance(t *testing.T) {
//		plugintest.Run(t, plugintest.Config{Cmd: []string{bin.Path(t)}})
//	}
type Binary struct {
	pkg, name string
}

// NewBinary describes the plugin in package pkg (a `go build` package
// argument; "." for the package under test), written as name.
func NewBinary(pkg, name string) *Binary { return &Binary{pkg: pkg, name: name} }

// Path builds the plugin on first use and returns the binary's path; a
// failed build fails tb with the compiler's output.
func (b *Binary) Path(tb testing.TB) string {
	tb.Helper()
	return gobuild.Binary(tb, "", b.pkg, b.name)
}

// Remove deletes this plugin's built binary and no other (the cache is
// shared with every Binary and with internal/testenv's GoBinary); a later
// Path builds it again. To remove every binary the test binary built, call
// Clean.
func (b *Binary) Remove() { gobuild.Remove("", b.pkg, b.name) }

// Clean removes every Go binary built so far through the shared cache
// (every Binary's, and internal/testenv's GoBinary's): call it from
// TestMain after m.Run.
func Clean() { gobuild.Clean() }
