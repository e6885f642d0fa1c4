// Package cpuprofile owns the CPU profile that the host and Go plugins
// write when their environment asks for one: with ARENAHOST_CPU_PROFILE
// naming a directory, `arenahost serve` and every plugin built on the Go
// SDK profile their whole run into DIR/NAME-PID.pprof, for `go tool
// pprof`. The host passes its environment to the plugins it starts, so
// setting the variable for the host profiles both sides of a call.
package cpuprofile

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
)

// Env names the directory profiles go to; unset or empty, nothing is
// profiled.
const Env = "ARENAHOST_CPU_PROFILE"

// Start begins a CPU profile for the process named name when Env is set,
// creating the directory if needed, and returns the function that stops it
// and closes the file (a no-op when Env is unset).
func Start(name string) (stop func() error, err error) {
	dir := os.Getenv(Env)
	if dir == "" {
		return func() error { return nil }, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", name, os.Getpid()))
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("cpu profile %s: %w", path, err)
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return fmt.Errorf("cpu profile %s: %w", path, err)
		}
		return nil
	}, nil
}
