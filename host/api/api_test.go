package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

func TestReadRoutes(t *testing.T) {
	f := newFixture(t, "", Options{})
	writeLoRA(t, filepath.Join(f.data, "loras", "styles", "ink.safetensors"), map[string]string{"ss_output_name": "ink-v2"})
	tests := []struct {
		c      call
		status int
		check  func(t *testing.T, b []byte)
	}{
		{call{method: "GET", path: "/v1/health"}, 200, func(t *testing.T, b []byte) { contains(t, b, `"status": "ok"`) }},
		{call{method: "GET", path: "/v1/arena"}, 200, func(t *testing.T, b []byte) {
			var st v1.ArenaStats
			mustJSON(t, b, &st)
			if st.Backend != "cpu-memfd" || st.Capacity != 1<<30 || st.Allocated == 0 || st.Regions == 0 {
				t.Fatalf("arena %+v", st)
			}
		}},
		{call{method: "GET", path: "/v1/models"}, 200, func(t *testing.T, b []byte) {
			var ms []v1.ModelInfo
			mustJSON(t, b, &ms)
			if len(ms) != 1 || ms[0].Name != "sample" || ms[0].Layout != "flux-bfl" || ms[0].Tensors == 0 || ms[0].Weights == 0 {
				t.Fatalf("models %+v", ms)
			}
		}},
		{call{method: "GET", path: "/v1/plugins"}, 200, func(t *testing.T, b []byte) { contains(t, b, "[]") }},
		{call{method: "GET", path: "/v1/loras"}, 200, func(t *testing.T, b []byte) {
			var all, ls []v1.LoRAFile
			mustJSON(t, b, &all)
			for _, e := range all {
				if e.Name == "styles/ink" {
					ls = append(ls, e)
				}
			}
			if len(ls) != 1 || ls[0].Name != "styles/ink" || ls[0].Kind != "lora" || ls[0].LoRA == nil || ls[0].LoRA.Modules != 2 ||
				ls[0].LoRA.Format != "kohya" || len(ls[0].LoRA.Ranks) != 1 || ls[0].LoRA.Ranks[0] != 2 {
				t.Fatalf("loras %s", b)
			}
		}},
		{call{method: "GET", path: "/sdapi/v1/loras"}, 200, func(t *testing.T, b []byte) {
			var all, ls []SDAPILoRA
			mustJSON(t, b, &all)
			for _, e := range all {
				if strings.HasSuffix(e.Path, "styles/ink.safetensors") {
					ls = append(ls, e)
				}
			}
			// A1111's name is the bare file name; tags find it by that name.
			if len(ls) != 1 || ls[0].Name != "ink" || ls[0].Alias != "ink-v2" || !filepath.IsAbs(ls[0].Path) ||
				ls[0].Metadata["ss_output_name"] != "ink-v2" {
				t.Fatalf("sdapi loras %s", b)
			}
			if _, err := os.Stat(ls[0].Path); err != nil {
				t.Fatalf("sdapi path: %v", err)
			}
		}},
		{call{method: "GET", path: "/metrics"}, 200, func(t *testing.T, b []byte) {
			for _, m := range []string{"arenahost_arena_allocated_bytes{backend=\"cpu-memfd\"}", "arenahost_arena_fragmentation_ratio", MetricJobsRunning, MetricPreviewDropped} {
				contains(t, b, m)
			}
		}},
		{call{method: "GET", path: "/"}, 200, func(t *testing.T, b []byte) { contains(t, b, `<meter id="arena-gauge"`) }},
		{call{method: "GET", path: "/app.js"}, 200, func(t *testing.T, b []byte) { contains(t, b, "/v1/loras/apply") }},
		{call{method: "GET", path: "/v1/nope"}, 404, func(t *testing.T, b []byte) { contains(t, b, `"code": "not_found"`) }},
		{call{method: "POST", path: "/"}, 404, func(t *testing.T, b []byte) { contains(t, b, "no route POST /") }},
		{call{method: "GET", path: "/v1/plugins/nope/logs"}, 404, func(t *testing.T, b []byte) { contains(t, b, "unknown plugin") }},
		{call{method: "POST", path: "/v1/plugins/nope/reload"}, 404, func(t *testing.T, b []byte) { contains(t, b, "unknown plugin") }},
		{call{method: "GET", path: "/v1/plugins/nope/logs?n=zero"}, 400, func(t *testing.T, b []byte) { contains(t, b, `query n=\"zero\"`) }},
	}
	for _, tt := range tests {
		t.Run(tt.c.method+" "+tt.c.path, func(t *testing.T) {
			status, b, h := f.do(t, tt.c)
			if status != tt.status {
				t.Fatalf("status %d, want %d: %s", status, tt.status, b)
			}
			if status >= 400 {
				wantError(t, tt.c, status, b, "", "")
				if ct := h.Get("Content-Type"); ct != "application/json" {
					t.Fatalf("error content type %q", ct)
				}
			}
			tt.check(t, b)
		})
	}
}

func TestModelLoadUnload(t *testing.T) {
	f := newFixture(t, "", Options{})
	models := filepath.Join(f.data, "models")
	outside := t.TempDir()
	sample := filepath.Join(models, samples.ModelFile)
	raw, err := os.ReadFile(sample)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "m.safetensors"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "m.safetensors"), filepath.Join(models, "escape.safetensors")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(models, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(sample, filepath.Join(models, "sub", "inside.safetensors")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(models, "junk.safetensors"), []byte("not a safetensors file"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Model folders: sharded, inside a pipeline, missing a shard, with a
	// config.json that disagrees with the weights.
	shardSample(t, sample, filepath.Join(models, "folder"), `{"num_layers": 2}`)
	shardSample(t, sample, filepath.Join(models, "pipe", "transformer"), `{}`)
	if err := os.WriteFile(filepath.Join(models, "pipe", "model_index.json"), []byte(`{"_class_name": "FluxPipeline"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	shardSample(t, sample, filepath.Join(models, "broken"), `{}`)
	second, _ := filepath.Glob(filepath.Join(models, "broken", "diffusion_pytorch_model-00002-of-*.safetensors"))
	if len(second) != 1 {
		t.Fatalf("shards %v", second)
	}
	if err := os.Remove(second[0]); err != nil {
		t.Fatal(err)
	}
	shard2 := filepath.Base(second[0])
	shardSample(t, sample, filepath.Join(models, "badcfg"), `{"num_layers": 19}`)
	allocated := f.s.Arena.Stats().Allocated
	tests := []struct {
		name   string
		c      call
		status int
		code   string
		detail string
	}{
		{"load sharded folder", call{method: "POST", path: "/v1/models", body: `{"path": "folder"}`}, 201, "", ""},
		{"load pipeline folder", call{method: "POST", path: "/v1/models", body: `{"path": "pipe"}`}, 201, "", ""},
		{"folder missing a shard", call{method: "POST", path: "/v1/models", body: `{"path": "broken"}`}, 400, "bad_model", "shard " + shard2},
		{"config disagrees", call{method: "POST", path: "/v1/models", body: `{"path": "badcfg"}`}, 400, "bad_model", "num_layers = 19 but the weights have 2 double blocks"},
		{"unload folder", call{method: "DELETE", path: "/v1/models/folder"}, 200, "", ""},
		{"unload pipeline", call{method: "DELETE", path: "/v1/models/pipe"}, 200, "", ""},
		{"load relative", call{method: "POST", path: "/v1/models", body: `{"path": "` + samples.ModelFile + `", "name": "copy"}`}, 201, "", ""},
		{"same name again", call{method: "POST", path: "/v1/models", body: `{"path": "` + samples.ModelFile + `", "name": "copy"}`}, 409, "conflict", "already loaded"},
		{"symlink inside", call{method: "POST", path: "/v1/models", body: `{"path": "sub/inside.safetensors"}`}, 201, "", ""},
		{"absolute inside", call{method: "POST", path: "/v1/models", body: `{"path": "` + sample + `", "name": "abs"}`}, 201, "", ""},
		{"dot dot", call{method: "POST", path: "/v1/models", body: `{"path": "../models/` + samples.ModelFile + `"}`}, 400, "bad_path", `".." is not allowed`},
		{"absolute outside", call{method: "POST", path: "/v1/models", body: `{"path": "` + filepath.Join(outside, "m.safetensors") + `"}`}, 400, "bad_path", "outside the configured directory"},
		{"symlink escape", call{method: "POST", path: "/v1/models", body: `{"path": "escape.safetensors"}`}, 400, "bad_path", "a symlink leads to"},
		{"missing file", call{method: "POST", path: "/v1/models", body: `{"path": "nope.safetensors"}`}, 404, "not_found", "no such file"},
		{"not safetensors", call{method: "POST", path: "/v1/models", body: `{"path": "junk.safetensors"}`}, 400, "bad_model", "junk.safetensors"},
		{"bad json", call{method: "POST", path: "/v1/models", body: `{"path": `}, 400, "bad_request", "read request body"},
		{"unknown field", call{method: "POST", path: "/v1/models", body: `{"file": "x"}`}, 400, "bad_request", `unknown field "file"`},
		{"trailing data", call{method: "POST", path: "/v1/models", body: `{"path": "x"} {}`}, 400, "bad_request", "data after"},
		{"empty path", call{method: "POST", path: "/v1/models", body: `{}`}, 400, "bad_request", "empty path"},
		{"bad name", call{method: "POST", path: "/v1/models", body: `{"path": "` + samples.ModelFile + `", "name": "a/b"}`}, 400, "bad_request", "not allowed"},
		{"unload", call{method: "DELETE", path: "/v1/models/copy"}, 200, "", ""},
		{"unload again", call{method: "DELETE", path: "/v1/models/copy"}, 404, "not_found", "not found"},
		{"unload symlinked", call{method: "DELETE", path: "/v1/models/inside"}, 200, "", ""},
		{"unload abs", call{method: "DELETE", path: "/v1/models/abs"}, 200, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, b, _ := f.do(t, tt.c)
			if status != tt.status {
				t.Fatalf("status %d, want %d: %s", status, tt.status, b)
			}
			if status >= 400 {
				wantError(t, tt.c, status, b, tt.code, tt.detail)
			}
		})
	}
	if got := f.s.Arena.Stats().Allocated; got != allocated {
		t.Fatalf("arena allocated %d after the loads and unloads, want %d as before (a leak or a partial load)", got, allocated)
	}
	if ms := f.s.Registry.Models(); len(ms) != 1 || ms[0].Name != "sample" {
		t.Fatalf("models left: %v", ms)
	}
}

// shardSample writes the sample model as a model folder of about three shards
// (each weight's tensors together) with config.json cfg.
func shardSample(t *testing.T, sample, dir, cfg string) {
	t.Helper()
	f, err := safetensors.Open(sample)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ts []safetensors.WriteTensor
	var total int64
	for _, ti := range f.Tensors {
		b, _ := f.Data(ti.Name)
		ts = append(ts, safetensors.WriteTensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
		total += int64(len(b))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	group := func(n string) string { return strings.SplitN(n, ".weight", 2)[0] }
	if err := safetensors.WriteSharded(dir, "diffusion_pytorch_model", nil, ts, total/3, group); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestToken(t *testing.T) {
	f := newFixture(t, "", Options{Token: "s3cret-token"})
	body := `{"path": "` + samples.ModelFile + `", "name": "t"}`
	tests := []struct {
		name   string
		c      call
		status int
		code   string
	}{
		{"read needs no token", call{method: "GET", path: "/v1/models"}, 200, ""},
		{"no token", call{method: "POST", path: "/v1/models", body: body}, 401, "unauthorized"},
		{"wrong token", call{method: "POST", path: "/v1/models", body: body, header: map[string]string{"Authorization": "Bearer s3cret-tokem"}}, 403, "forbidden"},
		{"prefix of token", call{method: "POST", path: "/v1/models", body: body, header: map[string]string{"Authorization": "Bearer s3cret"}}, 403, "forbidden"},
		{"not bearer", call{method: "POST", path: "/v1/models", body: body, header: map[string]string{"Authorization": "Basic czNjcmV0"}}, 401, "unauthorized"},
		{"delete without token", call{method: "DELETE", path: "/v1/models/sample"}, 401, "unauthorized"},
		{"reload without token", call{method: "POST", path: "/v1/plugins/x/reload"}, 401, "unauthorized"},
		{"right bearer", call{method: "POST", path: "/v1/models", body: body, header: map[string]string{"Authorization": "Bearer s3cret-token"}}, 201, ""},
		{"right header", call{method: "DELETE", path: "/v1/models/t", header: map[string]string{"X-Arenahost-Token": "s3cret-token"}}, 200, ""},
		{"cross origin", call{method: "DELETE", path: "/v1/models/sample", header: map[string]string{"X-Arenahost-Token": "s3cret-token", "Origin": "http://evil.example"}}, 403, "cross_origin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, b, h := f.do(t, tt.c)
			if status != tt.status {
				t.Fatalf("status %d, want %d: %s", status, tt.status, b)
			}
			if status >= 400 {
				wantError(t, tt.c, status, b, tt.code, "")
			}
			if status == 401 && h.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
		})
	}
	if _, ok := f.s.Registry.Model("sample"); !ok {
		t.Fatal("a refused request unloaded the sample model")
	}
}

func TestBodyLimit(t *testing.T) {
	f := newFixture(t, "", Options{MaxBody: 128})
	big := `{"path": "` + strings.Repeat("a", 500) + `"}`
	c := call{method: "POST", path: "/v1/models", body: big}
	status, b, _ := f.do(t, c)
	if status != http.StatusRequestEntityTooLarge {
		t.Fatalf("status %d: %s", status, b)
	}
	wantError(t, c, status, b, "too_large", "exceeds the 128-byte limit")

	// Without a Content-Length the limit trips while the body is read.
	req, _ := http.NewRequest("POST", f.srv.URL+"/v1/models", io.MultiReader(strings.NewReader(big)))
	req.ContentLength = -1
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "too_large") {
		t.Fatalf("chunked: status %d: %s", resp.StatusCode, b)
	}
	// A body under the limit still works.
	c = call{method: "POST", path: "/v1/models", body: `{"path": "` + samples.ModelFile + `", "name": "small"}`}
	if status, b, _ := f.do(t, c); status != 201 {
		t.Fatalf("small body: status %d: %s", status, b)
	}
}

// TestSlowClients serves on 127.0.0.1:0 with short timeouts: a client that
// never finishes its headers, or its body, is disconnected.
func TestSlowClients(t *testing.T) {
	f := newFixture(t, "", Options{})
	srv := HTTPServer(f.api, Limits{ReadHeaderTimeout: 200 * time.Millisecond, ReadTimeout: 400 * time.Millisecond, IdleTimeout: time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if srv.WriteTimeout != 0 {
		t.Fatal("HTTPServer sets a WriteTimeout: streaming routes would be cut")
	}
	tests := []struct {
		name, send string
	}{
		{"slow headers", "GET /v1/health HTTP/1.1\r\nHost: x\r\n"},
		{"slow body", "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pa"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, tt.send); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			start := time.Now()
			_, err = io.ReadAll(conn) // returns when the server closes the connection
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("server kept a slow client for %s", time.Since(start))
				}
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("disconnected after %s", d)
			}
		})
	}
}

// TestWriteDeadlines: a non-streaming route that answers for longer than
// WriteTimeout is cut; a streaming route (MJPEG, SSE) is not.
func TestWriteDeadlines(t *testing.T) {
	f := newFixture(t, "", Options{WriteTimeout: 150 * time.Millisecond})
	trickle := func(w http.ResponseWriter, r *http.Request) {
		for i := range 8 {
			if _, err := fmt.Fprintf(w, "chunk %d\n", i); err != nil {
				return
			}
			http.NewResponseController(w).Flush()
			time.Sleep(50 * time.Millisecond)
		}
	}
	f.api.mux.HandleFunc("GET /v1/test/slow", trickle)
	f.api.mux.HandleFunc("GET /v1/test/preview.mjpeg", trickle)
	f.api.mux.HandleFunc("GET /v1/test/events", trickle)
	for _, tt := range []struct {
		path     string
		complete bool
	}{{"/v1/test/slow", false}, {"/v1/test/preview.mjpeg", true}, {"/v1/test/events", true}} {
		t.Run(tt.path, func(t *testing.T) {
			resp, err := http.Get(f.srv.URL + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			n := 0
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				n++
			}
			if got := n == 8; got != tt.complete {
				t.Fatalf("read %d of 8 chunks (complete=%v, want %v)", n, got, tt.complete)
			}
		})
	}
}

func TestConfine(t *testing.T) {
	dir := t.TempDir()
	outside := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "a"), 0o755)
	os.WriteFile(filepath.Join(dir, "a", "f.safetensors"), nil, 0o644)
	os.WriteFile(filepath.Join(outside, "secret"), nil, 0o644)
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(dir, "out"))
	os.Symlink(outside, filepath.Join(dir, "outdir"))
	os.Symlink(filepath.Join(dir, "a", "f.safetensors"), filepath.Join(dir, "in"))
	realDir, _ := filepath.EvalSymlinks(dir)
	tests := []struct {
		p       string
		want    string
		wantErr error
	}{
		{"a/f.safetensors", filepath.Join(realDir, "a", "f.safetensors"), nil},
		{"./a//f.safetensors", filepath.Join(realDir, "a", "f.safetensors"), nil},
		{filepath.Join(dir, "a", "f.safetensors"), filepath.Join(realDir, "a", "f.safetensors"), nil},
		{"in", filepath.Join(realDir, "a", "f.safetensors"), nil},
		{"../x", "", errOutside},
		{"a/../../x", "", errOutside},
		{"a/../a/f.safetensors", "", errOutside},
		{filepath.Join(outside, "secret"), "", errOutside},
		{"out", "", errOutside},
		{"outdir/secret", "", errOutside},
		{"a/none", "", errNoFile},
		{"", "", nil},
		{"a\x00b", "", nil},
	}
	for _, tt := range tests {
		got, err := confine(dir, tt.p)
		switch {
		case tt.want != "":
			if err != nil || got != tt.want {
				t.Errorf("confine(%q) = %q, %v; want %q", tt.p, got, err, tt.want)
			}
		case tt.wantErr != nil:
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("confine(%q) = %q, %v; want %v", tt.p, got, err, tt.wantErr)
			}
		default:
			var se *StatusError
			if !errors.As(err, &se) || se.Status != 400 {
				t.Errorf("confine(%q) = %q, %v; want a 400", tt.p, got, err)
			}
		}
	}
}

func TestLoRAListingConfined(t *testing.T) {
	f := newFixture(t, "", Options{})
	loras := filepath.Join(f.data, "loras")
	// Only this test's files: clear the sample LoRAs written on first run.
	if err := os.RemoveAll(loras); err != nil {
		t.Fatal(err)
	}
	outside := t.TempDir()
	writeLoRA(t, filepath.Join(loras, "a.safetensors"), nil)
	writeLoRA(t, filepath.Join(outside, "secret.safetensors"), nil)
	os.Symlink(filepath.Join(outside, "secret.safetensors"), filepath.Join(loras, "leak.safetensors"))
	os.WriteFile(filepath.Join(loras, "broken.safetensors"), []byte("garbage"), 0o644)
	os.WriteFile(filepath.Join(loras, "notes.txt"), []byte("x"), 0o644)
	var ls []v1.LoRAFile
	_, b, _ := f.do(t, call{method: "GET", path: "/v1/loras"})
	mustJSON(t, b, &ls)
	if len(ls) != 2 || ls[0].Name != "a" || ls[0].Kind != "lora" || ls[1].Name != "broken" || ls[1].Error == "" {
		t.Fatalf("listing %s", b)
	}
	var sd []SDAPILoRA
	_, b, _ = f.do(t, call{method: "GET", path: "/sdapi/v1/loras"})
	mustJSON(t, b, &sd)
	if len(sd) != 1 || sd[0].Name != "a" || sd[0].Alias != "a" || sd[0].Metadata == nil {
		t.Fatalf("sdapi listing %s", b)
	}
	for _, tt := range []struct {
		name    string
		wantErr error
	}{{"a", nil}, {"a.safetensors", nil}, {"leak", errOutside}, {"../x", errOutside}, {"missing", errNoFile}} {
		_, err := f.api.LoRAPath(tt.name)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("LoRAPath(%q): %v, want %v", tt.name, err, tt.wantErr)
		}
	}
}

func TestPluginsReloadAndMetrics(t *testing.T) {
	f := newFixture(t, goHelloPlugins(t), Options{})
	var ps []struct {
		Name       string `json:"name"`
		Version    string `json:"version"`
		Kind       string `json:"kind"`
		Generation uint64 `json:"generation"`
		State      string `json:"state"`
		PID        int    `json:"pid"`
		Restarts   int    `json:"restarts"`
	}
	_, b, _ := f.do(t, call{method: "GET", path: "/v1/plugins"})
	mustJSON(t, b, &ps)
	if len(ps) != 1 || ps[0].Name != "go-hello" || ps[0].Version == "" || ps[0].Kind != "other" || ps[0].Generation != 1 || ps[0].State != "serving" || ps[0].PID == 0 {
		t.Fatalf("plugins %s", b)
	}
	status, b, _ := f.do(t, call{method: "POST", path: "/v1/plugins/go-hello/reload"})
	if status != 200 {
		t.Fatalf("reload: %d %s", status, b)
	}
	var st struct {
		Generation uint64 `json:"generation"`
		PID        int    `json:"pid"`
	}
	mustJSON(t, b, &st)
	if st.Generation != 2 || st.PID == ps[0].PID {
		t.Fatalf("after reload: %s", b)
	}
	status, b, _ = f.do(t, call{method: "GET", path: "/v1/plugins/go-hello/logs?n=5"})
	if status != 200 || !strings.HasPrefix(strings.TrimSpace(string(b)), "[") {
		t.Fatalf("logs: %d %s", status, b)
	}
	f.api.Metrics.ObserveApply("apply", "side", 30*time.Millisecond, nil)
	f.api.Metrics.ObservePreview(5 * time.Millisecond)
	f.api.Metrics.PreviewFramesDropped(3)
	f.api.Metrics.JobSubmitted()
	f.api.Metrics.JobStarted()
	_, b, _ = f.do(t, call{method: "GET", path: "/metrics"})
	for _, want := range []string{
		`arenahost_plugin_generation{plugin="go-hello"} 2`,
		`arenahost_plugin_swaps_total{plugin="go-hello"} 1`,
		`arenahost_plugin_restarts_total{plugin="go-hello"} 0`,
		`arenahost_plugin_up{plugin="go-hello",state="serving"} 1`,
		`arenahost_lora_apply_duration_seconds_count{mode="side",op="apply",result="ok"} 1`,
		`arenahost_preview_frames_dropped_total 3`,
		`arenahost_preview_latency_seconds_count 1`,
		`arenahost_jobs_total{state="submitted"} 1`,
		`arenahost_jobs_running 1`,
	} {
		contains(t, b, want)
	}
}

func contains(t *testing.T, b []byte, s string) {
	t.Helper()
	if !strings.Contains(string(b), s) {
		t.Fatalf("response lacks %q:\n%s", s, b)
	}
}

func mustJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%v: %s", err, b)
	}
}

// TestAbuseLoRACacheBounded: the listing cache holds only the files the
// directory holds now: LoRAs that come and go (a download folder's churn, a
// hostile writer) do not grow it over the host's life.
func TestAbuseLoRACacheBounded(t *testing.T) {
	f := newFixture(t, "", Options{})
	loras := filepath.Join(f.data, "loras")
	if err := os.RemoveAll(loras); err != nil {
		t.Fatal(err)
	}
	for round := range 5 {
		for i := range 20 {
			writeLoRA(t, filepath.Join(loras, fmt.Sprintf("r%d-%02d.safetensors", round, i)), nil)
		}
		if status, b, _ := f.do(t, call{method: "GET", path: "/v1/loras"}); status != 200 {
			t.Fatalf("listing: %d %s", status, b)
		}
		if n := f.api.loras.len(); n != 20 {
			t.Fatalf("round %d: %d cached entries, the directory holds 20", round, n)
		}
		for i := range 20 {
			if err := os.Remove(filepath.Join(loras, fmt.Sprintf("r%d-%02d.safetensors", round, i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, b, _ := f.do(t, call{method: "GET", path: "/sdapi/v1/loras"}); string(bytes.TrimSpace(b)) != "[]" {
		t.Fatalf("sdapi listing of an empty directory: %s", b)
	}
	if n := f.api.loras.len(); n != 0 {
		t.Fatalf("%d cached entries for an empty directory", n)
	}
}
