package plugin

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/manifest"
)

// A plugin whose manifest requires a module its interpreter lacks is never
// started: it is listed unavailable with the reason, calls fail with
// ErrNotServing, and a reload after the manifest is fixed starts it.
func TestRequiresPythonModules(t *testing.T) {
	python := testenv.Python(t)
	m, _ := newTestManager(t, Config{Env: map[string]string{"ARENAHOST_PYTHON": python}})
	path := copyPythonExample(t)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	missing := strings.Replace(string(orig), `"python_modules": [`, `"python_modules": ["arenahost_no_such_module", `, 1)
	if missing == string(orig) {
		t.Fatalf("the hello example's manifest declares no python_modules:\n%s", orig)
	}
	writeFile(t, path, missing, 0o644)
	man, err := manifest.Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	err = m.Add(t.Context(), man)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Add = %v, want ErrUnavailable", err)
	}
	st := mustStatus(t, m, "hello-py")
	if st.State != api.PluginUnavailable || st.Generation != 0 || st.PID != 0 ||
		!strings.Contains(st.LastError, "lacks module(s) arenahost_no_such_module") || !strings.Contains(st.LastError, python) {
		t.Fatalf("status = %+v, want unavailable naming the module and %s", st, python)
	}
	if _, err := m.Call(t.Context(), "hello-py", "stats", nil, nil); !errors.Is(err, ErrNotServing) || !strings.Contains(err.Error(), "arenahost_no_such_module") {
		t.Fatalf("Call on an unavailable plugin = %v, want ErrNotServing naming the module", err)
	}

	// Reloading with the module still missing keeps it unavailable.
	if err := m.Swap(t.Context(), "hello-py"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Swap = %v, want ErrUnavailable", err)
	}
	if st := mustStatus(t, m, "hello-py"); st.State != api.PluginUnavailable {
		t.Fatalf("after a refused reload: %+v", st)
	}
	// Needs met: a reload starts it.
	writeFile(t, path, string(orig), 0o644)
	if err := m.Swap(t.Context(), "hello-py"); err != nil {
		t.Fatalf("Swap after the fix: %v", err)
	}
	if st := mustStatus(t, m, "hello-py"); st.State != api.PluginServing || st.Generation == 0 {
		t.Fatalf("after the fix: %+v", st)
	}
}

// The check itself is bounded and names what went wrong with the
// interpreter (scripts standing in for one).
func TestRequiresCheckFailures(t *testing.T) {
	tests := []struct {
		name, script, want string
	}{
		{"hangs", "#!/bin/sh\nsleep 30\n", "timed out after"},
		{"crashes", "#!/bin/sh\necho 'Fatal Python error: boom' >&2\nexit 1\n", "cannot check its Python modules: Fatal Python error: boom"},
		{"answers nonsense", "#!/bin/sh\necho hello\n", `answered "hello" to the module check`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, _ := newTestManager(t, Config{StartTimeout: 500 * time.Millisecond})
			dir := filepath.Join(t.TempDir(), "p")
			writeFile(t, filepath.Join(dir, "interp"), tt.script, 0o755)
			writeFile(t, filepath.Join(dir, manifest.File), `{"name":"p","version":"1","kind":"pipeline","language":"python",
				"command":"./interp","args":["p.py"],"protocol_version":1,"requires":{"python_modules":["numpy"]}}`, 0o644)
			man, err := manifest.Parse(filepath.Join(dir, manifest.File))
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			err = m.Add(t.Context(), man)
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Add = %v, want ErrUnavailable", err)
			}
			if d := time.Since(t0); d > 10*time.Second {
				t.Fatalf("the check took %s despite a 500ms bound", d)
			}
			if st := mustStatus(t, m, "p"); st.State != api.PluginUnavailable || !strings.Contains(st.LastError, tt.want) || !strings.Contains(st.LastError, man.Path) {
				t.Fatalf("status = %+v, want unavailable with %q and the manifest's path", st, tt.want)
			}
		})
	}
}
