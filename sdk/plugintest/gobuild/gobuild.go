// Package gobuild owns the one cache of Go binaries that tests build: each
// main package is compiled once per test binary, as `make build` compiles
// it, into one temporary directory that Clean removes. sdk/plugintest's
// Binary (public: plugin authors use it) and internal/testenv's GoBinary
// (the repository's own tests) both build through it, so a package two
// helpers ask for is compiled once. It needs only the standard library, so
// any test may import it without pulling in the SDK.
package gobuild

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

var cache struct {
	mu      sync.Mutex
	dir     string // created on the first build
	entries map[key]*entry
}

// key is one build: the package argument and the directory go build runs
// in ("." names a different package in every directory).
type key struct{ dir, pkg, name string }

type entry struct {
	once sync.Once
	path string
	err  error
}

// Binary builds the main package pkg (a `go build` package argument: an
// import path, or a relative path resolved in dir; dir "" is the test's
// working directory) on first use and returns the executable, named name
// (filepath.Base(pkg) when empty). Later calls with the same arguments
// return the same file: do not modify it, copy it. A failed build fails tb
// with the compiler's output.
func Binary(tb testing.TB, dir, pkg, name string) string {
	tb.Helper()
	k := keyOf(dir, pkg, name)
	cache.mu.Lock()
	if cache.dir == "" {
		d, err := os.MkdirTemp("", "arenahost-testbin-")
		if err != nil {
			cache.mu.Unlock()
			tb.Fatalf("gobuild: %v", err)
		}
		cache.dir = d
		cache.entries = map[key]*entry{}
	}
	e := cache.entries[k]
	if e == nil {
		e = &entry{path: filepath.Join(cache.dir, fmt.Sprint(len(cache.entries)), name)}
		cache.entries[k] = e
	}
	cache.mu.Unlock()
	e.once.Do(func() {
		if err := os.MkdirAll(filepath.Dir(e.path), 0o755); err != nil {
			e.err = err
			return
		}
		cmd := exec.Command("go", "build", "-o", e.path, pkg)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			e.err = fmt.Errorf("go build %s (in %s): %v\n%s", pkg, dir, err, out)
		}
	})
	if e.err != nil {
		tb.Fatal(e.err)
	}
	return e.path
}

// keyOf resolves Binary's arguments to the cache key: name defaults to
// the package's base name, dir to the working directory, made absolute.
func keyOf(dir, pkg, name string) key {
	if name == "" {
		name = filepath.Base(pkg)
		if name == "." || name == string(filepath.Separator) {
			wd, _ := os.Getwd()
			name = filepath.Base(wd)
		}
	}
	if dir != "" {
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
	} else if wd, err := os.Getwd(); err == nil {
		dir = wd
	}
	return key{dir, pkg, name}
}

// Remove deletes the one binary Binary built for these arguments (nothing
// when it built none) and leaves every other; a later Binary call with
// them builds again.
func Remove(dir, pkg, name string) {
	k := keyOf(dir, pkg, name)
	cache.mu.Lock()
	defer cache.mu.Unlock()
	e := cache.entries[k]
	if e == nil {
		return
	}
	delete(cache.entries, k)
	_ = os.RemoveAll(filepath.Dir(e.path))
}

// Clean removes every binary built so far; call it from TestMain after
// m.Run. A later Binary call builds again.
func Clean() {
	cache.mu.Lock()
	defer cache.mu.Unlock()
	if cache.dir != "" {
		_ = os.RemoveAll(cache.dir)
	}
	cache.dir, cache.entries = "", nil
}
