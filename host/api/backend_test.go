package api

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/registry"
	v1 "github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// The Backend seam: the LoRA routes' translation of the coordinator's
// answers, tested with fakes behind the small interfaces and no plugin
// process (the routes' behaviour with real ones is in loras_apply_test.go).

type fakeHost struct{}

func (fakeHost) Prepare(string) {}
func (fakeHost) LookupTensors(context.Context, *pluginv1.LookupTensorsRequest) (*pluginv1.LookupTensorsResponse, error) {
	return &pluginv1.LookupTensorsResponse{}, nil
}
func (fakeHost) DeviceMemory() (uint64, uint64, bool) { return 0, 0, false }

type fakeArena struct{}

func (fakeArena) Stats() arena.Stats    { return arena.Stats{Backend: "fake", Capacity: 1 << 20} }
func (fakeArena) Leases() []arena.Lease { return nil }

type fakeRegistry struct{}

func (fakeRegistry) Models() []*registry.Model            { return nil }
func (fakeRegistry) Model(string) (*registry.Model, bool) { return nil, false }
func (fakeRegistry) Unload(name string) error {
	return fmt.Errorf("model %q: %w", name, registry.ErrNotFound)
}
func (fakeRegistry) Tensors(string, string) ([]*registry.Tensor, error) {
	return nil, registry.ErrNotFound
}
func (fakeRegistry) Load(context.Context, string, string, ...safetensors.Option) (*registry.Model, error) {
	return nil, registry.ErrNotFound
}
func (fakeRegistry) View(string, string, func(*registry.Tensor, []byte) error) error {
	return registry.ErrNotFound
}

type fakePlugins struct{}

func (fakePlugins) Status() []v1.PluginStatus { return nil }
func (fakePlugins) PluginStatus(name string) (v1.PluginStatus, error) {
	return v1.PluginStatus{}, fmt.Errorf("plugin %q: unknown", name)
}
func (fakePlugins) Swap(context.Context, string) error { return nil }
func (fakePlugins) Rescan(context.Context) (v1.RescanResult, error) {
	return v1.RescanResult{Added: []string{}, Removed: []string{}}, nil
}
func (fakePlugins) Logs(string, int) ([]v1.LogLine, error) { return nil, nil }

// fakeLoRAs answers with err, or with the request's set applied.
type fakeLoRAs struct {
	err  error
	last lora.Request
}

func (f *fakeLoRAs) Apply(_ context.Context, req lora.Request) (*v1.LoRAResult, error) {
	f.last = req
	if f.err != nil {
		return nil, f.err
	}
	return &v1.LoRAResult{LoRAState: v1.LoRAState{Model: req.Model, Mode: req.Mode, LoRAs: req.LoRAs}, Path: "apply"}, nil
}
func (f *fakeLoRAs) Remove(_ context.Context, model string) (*v1.LoRAResult, error) {
	return &v1.LoRAResult{LoRAState: v1.LoRAState{Model: model}, Path: "remove"}, f.err
}
func (f *fakeLoRAs) State(model string) (v1.LoRAState, error) {
	return v1.LoRAState{Model: model}, f.err
}
func (f *fakeLoRAs) Forget(string) {}

func fakeServer(t *testing.T, loras LoRAs) (*httptest.Server, string) {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{"models", "loras"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "loras", "style.safetensors"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	jobs := job.New(job.Config{Logger: quiet})
	t.Cleanup(func() { _ = jobs.Close(context.Background()) })
	b := Backend{Host: fakeHost{}, Arena: fakeArena{}, Registry: fakeRegistry{}, Plugins: fakePlugins{}, Jobs: jobs, LoRAs: loras,
		DataDir: dir, ModelsDir: filepath.Join(dir, "models"), LoRAsDir: filepath.Join(dir, "loras")}
	a := New(b, quiet)
	t.Cleanup(a.Close)
	srv := httptest.NewServer(a)
	t.Cleanup(srv.Close)
	return srv, dir
}

func TestLoRARoutesOverFakes(t *testing.T) {
	apply := `{"model": "m", "loras": [{"name": "style", "strength": 0.5}], "mode": "fuse"}`
	for _, tc := range []struct {
		name       string
		loras      LoRAs
		method     string
		path, body string
		status     int
		want       string
	}{
		{"applied", &fakeLoRAs{}, http.MethodPost, "/v1/loras/apply", apply, 200, `"path": "apply"`},
		{"bad LoRA is 422", &fakeLoRAs{err: fmt.Errorf("parse: %w", lora.ErrBadLoRA)}, http.MethodPost, "/v1/loras/apply", apply, 422, `"code": "bad_lora"`},
		{"unsupported is 409", &fakeLoRAs{err: fmt.Errorf("x: %w", lora.ErrUnsupported)}, http.MethodPost, "/v1/loras/apply", apply, 409, `"code": "unsupported"`},
		{"other errors are 500", &fakeLoRAs{err: io.ErrUnexpectedEOF}, http.MethodPost, "/v1/loras/apply", apply, 500, `"code": "internal"`},
		{"no coordinator: apply", nil, http.MethodPost, "/v1/loras/apply", apply, 503, `"code": "no_lora_engine"`},
		{"no coordinator: remove", nil, http.MethodDelete, "/v1/loras?model=m", "", 503, `"code": "no_lora_engine"`},
		{"no coordinator: state", nil, http.MethodGet, "/v1/loras/state?model=m", "", 503, `"code": "no_lora_engine"`},
		{"remove", &fakeLoRAs{}, http.MethodDelete, "/v1/loras?model=m", "", 200, `"path": "remove"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, dir := fakeServer(t, tc.loras)
			req, err := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.want) {
				t.Fatalf("%s %s: %d %s, want %d with %s", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.want)
			}
			if f, ok := tc.loras.(*fakeLoRAs); ok && tc.method == http.MethodPost {
				// The route confines the name to the LoRA directory and
				// passes the request's model, mode and strength on.
				want := filepath.Join(dir, "loras", "style.safetensors")
				if len(f.last.LoRAs) != 1 || f.last.LoRAs[0].Path != want || f.last.LoRAs[0].Strength != 0.5 || f.last.Model != "m" || f.last.Mode != v1.ModeFuse {
					t.Fatalf("coordinator got %+v, want style at %s, 0.5, model m, fuse", f.last, want)
				}
			}
		})
	}
}
