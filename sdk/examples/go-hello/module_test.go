package main

import (
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
	bin := testenv.OutOfTreeModule(t, "example.com/go-hello", "main.go")
	plugintest.Run(t, plugintest.Config{Cmd: []string{bin}, WantName: "go-hello", WantKind: "other"})
}
