package plugin

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/arenahost/arenahost/shared/manifest"
)

// resolved is a manifest with its command and args expanded.
type resolved struct {
	command string   // absolute path of the executable
	args    []string // expanded args
}

// resolveManifest expands ${VAR} references in command and args with lookup and
// resolves the command against the manifest's directory.
func resolveManifest(m *manifest.Manifest, lookup func(string) (string, bool)) (resolved, error) {
	expand := func(field, s string) (string, error) {
		var missing []string
		out := os.Expand(s, func(k string) string {
			v, ok := lookup(k)
			if !ok {
				missing = append(missing, k)
			}
			return v
		})
		if len(missing) > 0 {
			return "", fmt.Errorf("manifest %s: field %s: variable ${%s} is not set", m.Path, field, missing[0])
		}
		return out, nil
	}
	cmd, err := expand("command", m.Command)
	if err != nil {
		return resolved{}, err
	}
	if cmd == "" {
		return resolved{}, fmt.Errorf("manifest %s: field command: %q expands to nothing", m.Path, m.Command)
	}
	if !filepath.IsAbs(cmd) {
		cmd = filepath.Join(m.Dir(), cmd)
	}
	st, err := os.Stat(cmd)
	if err != nil {
		return resolved{}, fmt.Errorf("manifest %s: field command: %w (relative commands resolve against the manifest's directory; name interpreters by absolute path or ${VAR})", m.Path, err)
	}
	if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		return resolved{}, fmt.Errorf("manifest %s: field command: %s is not an executable file", m.Path, cmd)
	}
	r := resolved{command: cmd}
	for i, a := range m.Args {
		v, err := expand(fmt.Sprintf("args[%d]", i), a)
		if err != nil {
			return resolved{}, err
		}
		r.args = append(r.args, v)
	}
	return r, nil
}

// watchedFiles are the files whose change triggers a hot swap: the
// manifest, the command, and every arg that names an existing regular file
// inside the manifest's directory (a Python plugin's script).
func watchedFiles(m *manifest.Manifest, r resolved) []string {
	files := []string{m.Path, r.command}
	for _, a := range r.args {
		p := a
		if !filepath.IsAbs(p) {
			p = filepath.Join(m.Dir(), p)
		}
		rel, err := filepath.Rel(m.Dir(), p)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue
		}
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			files = append(files, p)
		}
	}
	return files
}
