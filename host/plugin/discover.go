package plugin

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
)

// ErrNoPluginsDir: Rescan was asked of a manager without a plugins
// directory (Config.Dir is empty).
var ErrNoPluginsDir = errors.New("no plugins directory configured")

// discovery is the live-discovery state of a Manager: which folders of the
// plugins directory have been seen, so that a new folder is started and a
// removed one is stopped without restarting the host.
type discovery struct {
	loaded atomic.Bool // Load has run: the plugins directory is ours to watch
	busy   atomic.Bool // a watch-driven reconcile is running
	mu     sync.Mutex  // one reconcile (watch or Rescan) at a time

	// Guarded by mu.
	pending  map[string]string // new manifest path -> fingerprint seen on the last poll
	missing  map[string]bool   // plugin name -> its manifest was missing on the last poll
	reported map[string]string // manifest path -> fingerprint whose error was already logged
	logged   map[string]bool   // manifest errors logged on the last poll (logged once while they last)
}

// Rescan reads the plugins directory now: every folder with a plugin.json
// that no registered plugin runs from is started, and every plugin whose
// plugin.json has disappeared from the directory is drained and stopped.
// The watch loop does the same on its own every PollInterval (after a
// change has held still for one poll); Rescan does not wait for that.
func (m *Manager) Rescan(ctx context.Context) (api.RescanResult, error) {
	if m.cfg.Dir == "" {
		return api.RescanResult{Added: []string{}, Removed: []string{}}, ErrNoPluginsDir
	}
	m.disc.mu.Lock()
	defer m.disc.mu.Unlock()
	return m.reconcile(ctx, true)
}

// discoverTick is the watch loop's share of live discovery: it starts one
// background reconcile unless one is still running (a start can take up to
// StartTimeout, and the loop must keep watching the running plugins).
func (m *Manager) discoverTick() {
	if m.cfg.Dir == "" || !m.disc.loaded.Load() || !m.disc.busy.CompareAndSwap(false, true) {
		return
	}
	m.bg.Add(1) // the watch loop holds a count, so this cannot race Close's Wait
	go func() {
		defer m.bg.Done()
		defer m.disc.busy.Store(false)
		m.disc.mu.Lock()
		defer m.disc.mu.Unlock()
		_, _ = m.reconcile(m.ctx, false)
	}()
}

// owned reports whether the plugin at manifest path came from the plugins
// directory (DIR/NAME/plugin.json), which discovery may stop when it goes.
func (m *Manager) owned(path string) bool {
	dir, err := filepath.Abs(m.cfg.Dir)
	if err != nil {
		return false
	}
	p, err := filepath.Abs(path)
	if err != nil {
		return false
	}
	return filepath.Dir(filepath.Dir(p)) == dir && filepath.Base(p) == manifest.File
}

// manifestGone reports whether the plugin's manifest has left the plugins
// directory (so its folder was removed or renamed away).
func manifestGone(path string) bool {
	_, err := os.Stat(path)
	return errors.Is(err, os.ErrNotExist)
}

// reconcile makes the registered plugins match the plugins directory.
// immediate (Rescan) acts on what it sees; otherwise (the watch loop) a new
// folder must look the same on two polls in a row, so a plugin still being
// copied in is not started half-written, and a manifest must be missing on
// two polls before its plugin is stopped. Callers hold m.disc.mu.
func (m *Manager) reconcile(ctx context.Context, immediate bool) (api.RescanResult, error) {
	d := &m.disc
	if d.pending == nil {
		d.pending, d.missing, d.reported = map[string]string{}, map[string]bool{}, map[string]string{}
	}
	res := api.RescanResult{Added: []string{}, Removed: []string{}}

	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return res, ErrClosed
	}
	byPath := map[string]string{} // manifest path -> plugin name
	var gone []string
	for name, p := range m.plugins {
		p.mu.Lock()
		path := p.manifest.Path
		p.mu.Unlock()
		abs, _ := filepath.Abs(path)
		byPath[abs] = name
		if m.owned(path) && manifestGone(path) {
			gone = append(gone, name)
		}
	}
	m.mu.Unlock()

	// Removed folders.
	sort.Strings(gone)
	goneSet := map[string]bool{}
	for _, name := range gone {
		goneSet[name] = true
		if !immediate && !d.missing[name] {
			d.missing[name] = true
			continue
		}
		delete(d.missing, name)
		m.log.Info("plugin folder removed; stopping plugin", "plugin", name)
		if err := m.Remove(ctx, name); err != nil && !errors.Is(err, ErrUnknownPlugin) {
			res.Errors = append(res.Errors, fmt.Sprintf("stop plugin %s: %v", name, err))
			continue
		}
		res.Removed = append(res.Removed, name)
	}
	for name := range d.missing {
		if !goneSet[name] {
			delete(d.missing, name) // it came back
		}
	}

	// New folders.
	mans, derr := manifest.Discover(m.cfg.Dir)
	logged := map[string]bool{}
	if derr != nil {
		for _, e := range splitJoined(derr) {
			key := e.Error()
			if !d.logged[key] {
				m.log.Warn("plugins directory: manifest not used", "dir", m.cfg.Dir, "err", e)
			}
			logged[key] = true
			res.Errors = append(res.Errors, key)
		}
	}
	d.logged = logged
	seen := map[string]bool{}
	for _, man := range mans {
		abs, _ := filepath.Abs(man.Path)
		seen[abs] = true
		if _, running := byPath[abs]; running {
			delete(d.pending, abs)
			continue
		}
		fp := m.fingerprint(man)
		if !immediate && d.pending[abs] != fp {
			d.pending[abs] = fp
			continue
		}
		delete(d.pending, abs)
		if _, err := m.get(man.Name); err == nil {
			msg := fmt.Sprintf("manifest %s: field name: %q is already registered by another folder; rename one of them", man.Path, man.Name)
			if d.reported[abs] != fp {
				d.reported[abs] = fp
				m.log.Warn("plugins directory: new folder not started", "err", msg)
			}
			res.Errors = append(res.Errors, msg)
			continue
		}
		delete(d.reported, abs)
		m.log.Info("new plugin folder found; starting plugin", "plugin", man.Name, "manifest", man.Path)
		if err := m.Add(ctx, man); err != nil {
			res.Errors = append(res.Errors, err.Error())
			if errors.Is(err, ErrClosed) {
				return res, err
			}
		}
		res.Added = append(res.Added, man.Name)
	}
	for _, path := range slices.Collect(maps.Keys(d.pending)) {
		if !seen[path] {
			delete(d.pending, path)
		}
	}
	return res, nil
}

// splitJoined undoes errors.Join, one error per manifest.
func splitJoined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
