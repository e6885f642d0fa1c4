package plugin

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/arenahost/arenahost/shared/manifest"
)

// fingerprint summarises the files a plugin runs from (manifest, command,
// script args): path, size, mtime and inode of each. A change means a new
// build to swap in.
func (m *Manager) fingerprint(man *manifest.Manifest) string {
	var b strings.Builder
	files := []string{man.Path}
	if r, err := resolveManifest(man, m.lookupEnv); err == nil {
		files = watchedFiles(man, r)
	} else {
		fmt.Fprintf(&b, "resolve error %v;", err)
	}
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			fmt.Fprintf(&b, "%s:missing;", f)
			continue
		}
		fmt.Fprintf(&b, "%s:%d:%d:%v;", f, st.Size(), st.ModTime().UnixNano(), inode(st))
	}
	return b.String()
}

// fingerprintPath fingerprints the plugin whose manifest is at path,
// reading the manifest afresh; a manifest that does not parse fingerprints
// as its own stat, so fixing it is a change too.
func (m *Manager) fingerprintPath(path string) string {
	man, err := manifest.Parse(path)
	if err != nil {
		st, serr := os.Stat(path)
		if serr != nil {
			return "manifest missing"
		}
		return fmt.Sprintf("bad manifest %d:%d", st.Size(), st.ModTime().UnixNano())
	}
	return m.fingerprint(man)
}

// watch polls every plugin's files and hot-swaps a plugin whose files have
// changed and then stayed the same for one more poll (so a binary still
// being written is not started).
func (m *Manager) watch() {
	defer m.bg.Done()
	t := time.NewTicker(m.cfg.PollInterval)
	defer t.Stop()
	pending := map[string]string{}
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		}
		m.discoverTick() // discover.go: new and removed folders
		m.mu.Lock()
		ps := slices.Collect(maps.Values(m.plugins))
		m.mu.Unlock()
		for _, p := range ps {
			if p.watchBusy.Load() {
				continue
			}
			p.mu.Lock()
			path, cur := p.manifest.Path, p.fingerprint
			p.mu.Unlock()
			if m.disc.loaded.Load() && m.cfg.Dir != "" && m.owned(path) && manifestGone(path) {
				continue // its folder was removed: discovery stops it
			}
			fp := m.fingerprintPath(path)
			if fp == cur {
				delete(pending, p.name)
				continue
			}
			if pending[p.name] != fp {
				pending[p.name] = fp
				continue
			}
			delete(pending, p.name)
			p.watchBusy.Store(true)
			go func() {
				defer p.watchBusy.Store(false)
				_ = p.swap(m.ctx, "files changed")
			}()
		}
	}
}
