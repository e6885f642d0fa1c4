package api

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

func TestChoosePipeline(t *testing.T) {
	unavailable := v1.PluginStatus{Name: "a-diffusers", Kind: "pipeline", State: v1.PluginUnavailable, LastError: "Python /p lacks module(s) torch"}
	failed := v1.PluginStatus{Name: "b-failed", Kind: "pipeline", State: v1.PluginFailed, LastError: "handshake: no grpc"}
	serving := v1.PluginStatus{Name: "c-reference", Kind: "pipeline", State: v1.PluginServing}
	starting := v1.PluginStatus{Name: "d-starting", Kind: "pipeline", State: v1.PluginStarting}
	lora := v1.PluginStatus{Name: "a-lora", Kind: "lora", State: v1.PluginServing}
	tests := []struct {
		name       string
		configured string
		ps         []v1.PluginStatus
		want, err  string
	}{
		{"the runnable one, not the first by name", "", []v1.PluginStatus{lora, unavailable, failed, serving, starting}, "c-reference", ""},
		{"none runnable says why for each", "", []v1.PluginStatus{unavailable, failed, starting}, "", "no pipeline plugin can run: a-diffusers is unavailable: Python /p lacks module(s) torch; b-failed is failed: handshake: no grpc; d-starting is starting"},
		{"none installed", "", []v1.PluginStatus{lora}, "", "no pipeline plugin is installed"},
		{"configured wins", "a-lora", []v1.PluginStatus{serving, lora}, "a-lora", ""},
		{"configured unavailable is not replaced", "a-diffusers", []v1.PluginStatus{unavailable, serving}, "", `pipeline "a-diffusers" (--pipeline) cannot run: a-diffusers is unavailable: Python /p lacks module(s) torch`},
		{"configured missing", "nope", []v1.PluginStatus{serving}, "", `pipeline "nope" (--pipeline) is not installed`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := choosePipeline(tt.configured, tt.ps)
			if tt.err != "" {
				var se *StatusError
				if err == nil || !strings.Contains(err.Error(), tt.err) || !errors.As(err, &se) || se.Status != 503 {
					t.Fatalf("choosePipeline = %q, %v; want a 503 containing %q", got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("choosePipeline = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// needsMissingModule installs a Python pipeline named aaa-needs-torch
// (first by name, as diffusers-flux is before reference-pipeline) whose
// manifest requires a module the core environment lacks.
func needsMissingModule(t *testing.T, plugins string) {
	t.Helper()
	t.Setenv("ARENAHOST_PYTHON", testenv.Python(t))
	dir := filepath.Join(plugins, "aaa-needs-torch")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	man := `{"name": "aaa-needs-torch", "version": "0.1.0", "kind": "pipeline", "language": "python",
	  "command": "${ARENAHOST_PYTHON}", "args": ["-u", "p.py"], "protocol_version": 1,
	  "requires": {"python_modules": ["numpy", "arenahost_test_no_such_module"]}}`
	if err := os.WriteFile(filepath.Join(dir, "plugin.json"), []byte(man), 0o644); err != nil {
		t.Fatal(err)
	}
	// Were it started, it would serve (and be picked first): the script
	// is the reference pipeline.
	src, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "sdk", "python", "examples", "reference_pipeline", "reference_pipeline.py"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "p.py"), src, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A pipeline whose module is missing is listed unavailable and never
// chosen: txt2img, POST /v1/jobs without a pipeline and GET /v1/pipelines
// all name the runnable one; naming the unavailable one is a 503 that says
// why.
func TestDefaultPipelineSkipsUnavailable(t *testing.T) {
	plugins := txt2imgPlugins(t)
	needsMissingModule(t, plugins)
	f := newFixture(t, plugins, Options{})

	_, b, _ := f.do(t, call{method: "GET", path: "/v1/pipelines"})
	var ps v1.Pipelines
	mustJSON(t, b, &ps)
	if ps.Default != "test-pipeline" || len(ps.Pipelines) != 2 || ps.Pipelines[0].Name != "aaa-needs-torch" ||
		ps.Pipelines[0].State != v1.PluginUnavailable || ps.Pipelines[0].Runnable ||
		!strings.Contains(ps.Pipelines[0].Reason, "lacks module(s) arenahost_test_no_such_module") || !ps.Pipelines[1].Runnable {
		t.Fatalf("GET /v1/pipelines = %s", b)
	}

	status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "a cat", "steps": 2, "seed": 1, "width": 32, "height": 48}`})
	if status != 200 {
		t.Fatalf("txt2img: %d %s", status, b)
	}
	var res Txt2ImgResponse
	mustJSON(t, b, &res)
	var info Txt2ImgInfo
	if err := json.Unmarshal([]byte(res.Info), &info); err != nil || info.Pipeline != "test-pipeline" || len(res.Images) != 1 {
		t.Fatalf("txt2img info %q (%v), %d images", res.Info, err, len(res.Images))
	}

	status, b, _ = f.do(t, call{method: "POST", path: "/v1/jobs", body: `{"params": {"steps": 2}}`})
	var created v1.JobCreated
	mustJSON(t, b, &created)
	if status != 201 || created.Pipeline != "test-pipeline" {
		t.Fatalf("POST /v1/jobs without a pipeline: %d %s", status, b)
	}

	c := call{method: "POST", path: "/v1/jobs", body: `{"pipeline": "aaa-needs-torch"}`}
	status, b, _ = f.do(t, c)
	if status != 503 {
		t.Fatalf("POST /v1/jobs on the unavailable pipeline: %d %s", status, b)
	}
	wantError(t, c, status, b, "unavailable", "arenahost_test_no_such_module")

	c = call{method: "POST", path: "/v1/plugins/aaa-needs-torch/reload"}
	status, b, _ = f.do(t, c)
	if status != 503 {
		t.Fatalf("reload of the unavailable pipeline: %d %s", status, b)
	}
	wantError(t, c, status, b, "unavailable", "arenahost_test_no_such_module")
}

// With no pipeline able to run, txt2img and POST /v1/jobs answer 503 naming
// each pipeline and why.
func TestTxt2ImgOnlyUnavailablePipelines(t *testing.T) {
	plugins := t.TempDir()
	needsMissingModule(t, plugins)
	f := newFixture(t, plugins, Options{})
	for _, c := range []call{
		{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "a cat"}`},
		{method: "POST", path: "/v1/jobs", body: `{}`},
	} {
		status, b, _ := f.do(t, c)
		if status != 503 {
			t.Fatalf("%s %s: %d %s", c.method, c.path, status, b)
		}
		wantError(t, c, status, b, "unavailable", "no pipeline plugin can run: aaa-needs-torch is unavailable: Python "+testenv.Python(t)+" lacks module(s) arenahost_test_no_such_module")
	}
}
