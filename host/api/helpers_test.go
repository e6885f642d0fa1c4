package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type fixture struct {
	s    *server.Server
	api  *API
	srv  *httptest.Server
	data string
}

// backendOf is host/cli's wiring of a server into a Backend.
func backendOf(s *server.Server) Backend {
	cfg := s.Config()
	b := Backend{Host: s, Arena: s.Arena, Registry: s.Registry, Plugins: s.Plugins, Jobs: s.Jobs,
		DataDir: cfg.DataDir, ModelsDir: cfg.ModelsDir, LoRAsDir: cfg.LoRAsDir}
	if s.LoRAs != nil {
		b.LoRAs = s.LoRAs
	}
	return b
}

// newFixture starts a real server (arena, registry with the sample model,
// plugins from pluginsDir) behind a real listener.
func newFixture(t *testing.T, pluginsDir string, o Options) *fixture {
	t.Helper()
	data := t.TempDir()
	ctx := context.Background()
	s, err := server.New(ctx, server.Config{DataDir: data, PluginsDir: pluginsDir, ArenaCapacity: 1 << 30, Samples: true, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(ctx) })
	a := NewWithOptions(backendOf(s), quiet, o)
	t.Cleanup(a.Close)
	srv := httptest.NewServer(a)
	t.Cleanup(srv.Close)
	return &fixture{s: s, api: a, srv: srv, data: data}
}

type call struct {
	method, path, body string
	header             map[string]string
}

// do sends c and returns the status and the body.
func (f *fixture) do(t *testing.T, c call) (int, []byte, http.Header) {
	t.Helper()
	var body io.Reader
	if c.body != "" {
		body = strings.NewReader(c.body)
	}
	req, err := http.NewRequest(c.method, f.srv.URL+c.path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range c.header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", c.method, c.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", c.method, c.path, err)
	}
	return resp.StatusCode, b, resp.Header
}

// wantError checks an error response: JSON {error, code, detail}.
func wantError(t *testing.T, c call, status int, b []byte, code, detail string) {
	t.Helper()
	var e v1.Error
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("%s %s: error body is not JSON: %v: %s", c.method, c.path, err, b)
	}
	if e.Error != http.StatusText(status) || (code != "" && e.Code != code) || !strings.Contains(e.Detail, detail) {
		t.Fatalf("%s %s: error %+v, want code %q and detail containing %q", c.method, c.path, e, code, detail)
	}
}

func TestMain(m *testing.M) { testenv.Main(m) }

// goHelloPlugins installs the Go SDK's go-hello example (built once per
// test binary) into a fresh plugins directory (DIR/go-hello/{go-hello,plugin.json}).
func goHelloPlugins(t *testing.T) string {
	t.Helper()
	man, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "sdk", "examples", "go-hello", "plugin.json"))
	if err != nil {
		t.Fatal(err)
	}
	plugins := t.TempDir()
	testenv.InstallPlugin(t, plugins, "go-hello", "./sdk/examples/go-hello", string(man))
	return plugins
}

// goManifest is the manifest of a Go plugin installed as DIR/NAME/NAME.
func goManifest(name, kind string) string {
	return fmt.Sprintf(`{"name": %q, "version": "0.1.0", "kind": %q, "language": "go", "command": "./%s", "protocol_version": 1}`, name, kind, name)
}

// writeLoRA writes a small kohya-format Flux LoRA (rank 2, two modules).
func writeLoRA(t *testing.T, path string, meta map[string]string) {
	t.Helper()
	f32 := func(n int) []byte { return make([]byte, 4*n) }
	var ts []safetensors.WriteTensor
	for _, m := range []struct {
		key     string
		in, out int64
	}{{"lora_unet_double_blocks_0_img_attn_proj", 64, 64}, {"lora_unet_single_blocks_0_linear2", 320, 64}} {
		ts = append(ts,
			safetensors.WriteTensor{Name: m.key + ".lora_down.weight", DType: "F32", Shape: []int64{2, m.in}, Data: f32(int(2 * m.in))},
			safetensors.WriteTensor{Name: m.key + ".lora_up.weight", DType: "F32", Shape: []int64{m.out, 2}, Data: f32(int(2 * m.out))},
			safetensors.WriteTensor{Name: m.key + ".alpha", DType: "F32", Shape: []int64{}, Data: f32(1)},
		)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := safetensors.WriteFile(path, meta, ts); err != nil {
		t.Fatal(err)
	}
}
