package api

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/internal/testenv"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

// livePlugin is a small Python plugin whose "version" method answers the
// version it was written with; body is spliced in before serve().
const livePlugin = `from arenahost import Plugin, PluginError
plugin = Plugin("live-py", "%[1]s", kind="pipeline")

@plugin.method(description="the version written into this file")
def version(call, args):
    return {"version": "%[1]s"}

%[2]s
if __name__ == "__main__":
    plugin.serve()
`

// live-py is a pipeline whose one public method is version: /v1/jobs runs
// only pipelines' public methods (docs/security.md).
const liveManifest = `{"name": "live-py", "version": "0.1.0", "kind": "pipeline", "language": "python",
  "command": "${ARENAHOST_PYTHON}", "args": ["-u", "live.py"], "protocol_version": 1, "public_methods": ["version"]}`

// writeLive writes the plugin's script (and manifest) into dir, through a
// rename so the watcher never sees half a file.
func writeLive(t *testing.T, dir, version, extra string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"live.py": fmt.Sprintf(livePlugin, version, extra), "plugin.json": liveManifest} {
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}

// callVersion runs live-py's "version" method as a job and returns what
// it answered.
func (f *fixture) callVersion(t *testing.T) string {
	t.Helper()
	id := f.createJob(t, `{"pipeline": "live-py", "method": "version", "preview": {"method": "none"}}`)
	snap := f.waitJob(t, id)
	if snap.State != v1.JobDone {
		t.Fatalf("job on live-py: %+v", snap)
	}
	res, ok := snap.Result.(map[string]any)
	if !ok {
		t.Fatalf("job result %#v", snap.Result)
	}
	return fmt.Sprint(res["version"])
}

func (f *fixture) pluginStatus(t *testing.T, name string) (v1.PluginStatus, int) {
	t.Helper()
	status, b, _ := f.do(t, call{method: "GET", path: "/v1/plugins"})
	if status != 200 {
		t.Fatalf("GET /v1/plugins: %d %s", status, b)
	}
	var ps []v1.PluginStatus
	mustJSON(t, b, &ps)
	for _, p := range ps {
		if p.Name == name {
			return p, len(ps)
		}
	}
	return v1.PluginStatus{}, len(ps)
}

// A Python plugin copied into the plugins directory of a running host
// serves within 5 s, with no restart and no request; a reload of a version
// with a syntax error, then of one whose warm-up refuses, answers 422 with
// the plugin's own error first while the old version keeps serving; the
// next good reload clears last_error (its time stays); removing the folder
// stops the plugin.
func TestLiveDiscoveryAndHonestSwapErrors(t *testing.T) {
	t.Setenv("ARENAHOST_PYTHON", testenv.Python(t))
	t.Setenv("PYTHONPATH", filepath.Join(testenv.RepoRoot(t), "sdk", "python"))
	plugins := t.TempDir()
	f := newFixture(t, plugins, Options{})
	if _, n := f.pluginStatus(t, "live-py"); n != 0 {
		t.Fatalf("plugins at start: %d, want 0", n)
	}

	// Copy it in while the host runs: the watcher finds it.
	dir := filepath.Join(plugins, "live-py")
	t0 := time.Now()
	writeLive(t, dir, "1", "")
	for {
		st, _ := f.pluginStatus(t, "live-py")
		if st.State == v1.PluginServing {
			t.Logf("new plugin serving after %v (generation %d, pid %d)", time.Since(t0).Round(time.Millisecond), st.Generation, st.PID)
			break
		}
		if time.Since(t0) > 5*time.Second {
			t.Fatalf("live-py not serving 5 s after it was copied in: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v := f.callVersion(t); v != "1" {
		t.Fatalf("version %q, want 1", v)
	}

	for _, tc := range []struct {
		name, version, extra, want, prefix string
	}{
		{"syntax error", "2", "def broken(:\n    pass\n", "SyntaxError", "SyntaxError: "},
		{"warm-up refuses", "3", "@plugin.method()\ndef warmup(call, args):\n    raise PluginError(\"no weights in /nowhere\")\n",
			"no weights in /nowhere", "plugin live-py: method 'warmup': no weights in /nowhere"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			writeLive(t, dir, tc.version, tc.extra)
			c := call{method: "POST", path: "/v1/plugins/live-py/reload"}
			status, b, _ := f.do(t, c)
			wantError(t, c, http.StatusUnprocessableEntity, b, "swap_refused", tc.want)
			var e v1.Error
			mustJSON(t, b, &e)
			t.Logf("detail: %s", e.Detail)
			if !strings.HasPrefix(e.Detail, tc.prefix) {
				t.Errorf("detail does not open with the plugin's error %q: %s", tc.prefix, e.Detail)
			}
			if strings.HasPrefix(e.Detail, "reload") || strings.Index(e.Detail, "This usually means") >= 0 && strings.Index(e.Detail, "This usually means") < strings.Index(e.Detail, tc.want) {
				t.Errorf("detail opens with the host's words: %s", e.Detail)
			}
			if status != http.StatusUnprocessableEntity {
				t.Fatalf("status %d", status)
			}
			if v := f.callVersion(t); v != "1" {
				t.Fatalf("after a refused swap the old version should serve: version %q", v)
			}
			st, _ := f.pluginStatus(t, "live-py")
			if st.State != v1.PluginServing || !strings.Contains(st.LastError, tc.want) || st.LastErrorAt.IsZero() {
				t.Fatalf("status after refused swap: %+v", st)
			}
		})
	}

	// The watcher must not swap the broken files in on its own meanwhile;
	// a good version then clears last_error and keeps its time.
	writeLive(t, dir, "4", "")
	c := call{method: "POST", path: "/v1/plugins/live-py/reload"}
	if status, b, _ := f.do(t, c); status != 200 {
		t.Fatalf("reload good version: %d %s", status, b)
	}
	st, _ := f.pluginStatus(t, "live-py")
	if st.LastError != "" || st.LastErrorAt.IsZero() || st.State != v1.PluginServing {
		t.Fatalf("after a good swap last_error should clear and keep its time: %+v", st)
	}
	if v := f.callVersion(t); v != "4" {
		t.Fatalf("version %q, want 4", v)
	}

	// Removing the folder stops the plugin; rescan says so.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	status, b, _ := f.do(t, call{method: "POST", path: "/v1/plugins/rescan"})
	if status != 200 {
		t.Fatalf("rescan: %d %s", status, b)
	}
	var res v1.RescanResult
	mustJSON(t, b, &res)
	if _, n := f.pluginStatus(t, "live-py"); n != 0 {
		// The watcher may have removed it first; either way it is gone.
		t.Fatalf("live-py still listed after its folder was removed (rescan %s)", b)
	}
	if status, b, _ := f.do(t, call{method: "POST", path: "/v1/plugins/live-py/reload"}); status != 404 {
		t.Fatalf("reload of a removed plugin: %d %s", status, b)
	}
}

// POST /v1/plugins/rescan starts a new folder at once, and a reload of a
// name the host has not seen yet finds its folder first.
func TestRescanRoute(t *testing.T) {
	t.Setenv("ARENAHOST_PYTHON", testenv.Python(t))
	t.Setenv("PYTHONPATH", filepath.Join(testenv.RepoRoot(t), "sdk", "python"))
	plugins := t.TempDir()
	f := newFixture(t, plugins, Options{})
	writeLive(t, filepath.Join(plugins, "live-py"), "1", "")
	status, b, _ := f.do(t, call{method: "POST", path: "/v1/plugins/rescan"})
	if status != 200 {
		t.Fatalf("rescan: %d %s", status, b)
	}
	var res v1.RescanResult
	mustJSON(t, b, &res)
	if st, _ := f.pluginStatus(t, "live-py"); st.State != v1.PluginServing {
		// The watcher may have started it just before the rescan did.
		t.Fatalf("after rescan %s: %+v", b, st)
	}
	if v := f.callVersion(t); v != "1" {
		t.Fatalf("version %q", v)
	}
}
