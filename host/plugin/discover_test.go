package plugin

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
)

// Rescan starts new folders, stops removed ones and reports what it could
// not use (a manifest that does not parse, a name another folder took)
// without starting it; fixing it, or freeing the name, makes the next
// rescan start it. A plugin
// added outside the directory is never touched.
func TestRescan(t *testing.T) {
	dir := t.TempDir()
	m, _ := newTestManager(t, Config{Dir: dir})
	writeFixture(t, dir, "one", "echo", nil)
	if err := m.Load(t.Context()); err != nil {
		t.Fatal(err)
	}
	outside := addFixture(t, m, t.TempDir(), "outside", "echo", nil)

	writeFixture(t, dir, "two", "echo", nil)
	// A second folder declaring the name "one".
	writeFixture(t, dir, "one-again", "echo", func(man *manifest.Manifest) { man.Name, man.Args[2] = "one", "one" })
	// A manifest that does not parse.
	if err := os.MkdirAll(filepath.Join(dir, "broken"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "broken", manifest.File), []byte(`{"name": "broken",`), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := m.Rescan(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Added, []string{"two"}) || len(res.Removed) != 0 {
		t.Fatalf("rescan %+v, want two added", res)
	}
	joined := strings.Join(res.Errors, "\n")
	for _, want := range []string{filepath.Join("broken", manifest.File), `"one" already declared by`} {
		if !strings.Contains(joined, want) {
			t.Errorf("rescan errors %q lack %q", joined, want)
		}
	}
	if st, err := m.PluginStatus("two"); err != nil || st.State != api.PluginServing {
		t.Fatalf("two: %+v, %v", st, err)
	}

	// Fix the broken one, remove "one": the next rescan starts and stops.
	writeFixture(t, dir, "broken", "echo", nil)
	if err := os.RemoveAll(filepath.Join(dir, "one")); err != nil {
		t.Fatal(err)
	}
	res, err = m.Rescan(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	// The folder that declared "one" too takes the name in the same pass.
	if !slices.Equal(res.Removed, []string{"one"}) || !slices.Equal(res.Added, []string{"broken", "one"}) {
		t.Fatalf("second rescan %+v, want one removed, broken and the other one added", res)
	}
	if st, err := m.PluginStatus("one"); err != nil || st.Manifest != filepath.Join(dir, "one-again", manifest.File) || st.State != api.PluginServing {
		t.Fatalf("one after its folder went: %+v, %v; want the one-again folder's plugin serving", st, err)
	}
	if res, err = m.Rescan(t.Context()); err != nil || len(res.Added)+len(res.Removed)+len(res.Errors) != 0 {
		t.Fatalf("a rescan with nothing new: %+v, %v", res, err)
	}
	if st, err := m.PluginStatus(outside.Name); err != nil || st.State != api.PluginServing {
		t.Fatalf("a plugin added outside the directory: %+v, %v", st, err)
	}
}

// The watcher does the same on its own, once a new folder has held still
// for a poll, and stops a removed folder's plugin; without Load it does
// nothing (the directory is not yet its to watch).
func TestWatcherDiscovers(t *testing.T) {
	dir := t.TempDir()
	m, _ := newTestManager(t, Config{Dir: dir, PollInterval: 50 * time.Millisecond})
	writeFixture(t, dir, "early", "echo", nil)
	time.Sleep(300 * time.Millisecond)
	if _, err := m.PluginStatus("early"); !errors.Is(err, ErrUnknownPlugin) {
		t.Fatalf("the watcher started a plugin before Load: %v", err)
	}
	if err := m.Load(t.Context()); err != nil {
		t.Fatal(err)
	}
	writeFixture(t, dir, "late", "echo", nil)
	waitFor(t, 10*time.Second, "new folder late serving", func() bool {
		st, err := m.PluginStatus("late")
		return err == nil && st.State == api.PluginServing
	})
	if err := os.RemoveAll(filepath.Join(dir, "early")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "removed folder early stopped", func() bool {
		_, err := m.PluginStatus("early")
		return errors.Is(err, ErrUnknownPlugin)
	})
}

func TestRescanWithoutDir(t *testing.T) {
	m, _ := newTestManager(t, Config{})
	if _, err := m.Rescan(t.Context()); !errors.Is(err, ErrNoPluginsDir) {
		t.Fatalf("rescan without a directory: %v", err)
	}
}
