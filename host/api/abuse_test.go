package api

// The abuse suite: each defect an attacker found against `arenahost serve`
// on loopback (issue 15) as a table of requests against a real server with
// the real lora-nf4, preview and test pipeline plugins. Every case checks
// the status, the JSON error code and that the detail names what was wrong;
// file cases also bound the time (a FIFO must not hang anything).

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/arenahost/arenahost/host/plugin"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// abuseCase is one hostile request and what it must answer.
type abuseCase struct {
	name   string
	c      call
	status int
	code   string // "" for a success
	detail string // a substring of the error detail
}

// run sends every case and checks its answer is JSON with the status and
// code, within bound.
func (f *fixture) run(t *testing.T, cases []abuseCase, bound time.Duration) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, b := f.send(t, tc.c)
			if took := time.Since(start); took > bound {
				t.Errorf("%s %s took %v, over %v", tc.c.method, tc.c.path, took, bound)
			}
			if status != tc.status {
				t.Fatalf("%s %s: %d %s, want %d", tc.c.method, tc.c.path, status, b, tc.status)
			}
			if tc.code == "" {
				if !json.Valid(b) {
					t.Fatalf("%s %s: body is not JSON: %q", tc.c.method, tc.c.path, b)
				}
				return
			}
			wantError(t, tc.c, status, b, tc.code, tc.detail)
		})
	}
}

// send is fixture.do that also sets the Host header (Go's client takes it
// from Request.Host, not from the header map).
func (f *fixture) send(t *testing.T, c call) (int, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), c.method, f.srv.URL+c.path, strings.NewReader(c.body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range c.header {
		if k == "Host" {
			req.Host = v
			continue
		}
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
	return resp.StatusCode, b
}

func abuseFixture(t *testing.T, o Options) *fixture {
	t.Helper()
	f := newFixture(t, txt2imgPlugins(t), o)
	f.api.hosts = newHostPolicy(f.srv.Listener.Addr().String(), o.AllowedHosts)
	return f
}

// TestAbuseLeastPrivilege: /v1/jobs runs only the public methods of
// pipeline plugins; the LoRA and preview plugins' methods never answer a
// request.
func TestAbuseLeastPrivilege(t *testing.T) {
	f := abuseFixture(t, Options{})
	lora := filepath.Join(f.data, "loras", samples.KohyaLoRAFile)
	outside := t.TempDir()
	writeLoRA(t, filepath.Join(outside, "secret.safetensors"), nil)
	job := func(body string) call { return call{method: "POST", path: "/v1/jobs", body: body} }
	f.run(t, []abuseCase{
		{"lora inspect", job(fmt.Sprintf(`{"pipeline": "lora-nf4", "method": "inspect", "params": {"path": %q}}`, filepath.Join(outside, "secret.safetensors"))),
			403, "method_not_public", `plugin "lora-nf4" is of kind "lora"`},
		{"lora inspect of a system file", job(`{"pipeline": "lora-nf4", "method": "inspect", "params": {"path": "/etc/passwd"}}`),
			403, "method_not_public", `method "inspect"`},
		{"lora apply", job(fmt.Sprintf(`{"pipeline": "lora-nf4", "method": "apply", "params": {"loras": [{"path": %q, "strength": 1}]}}`, lora)),
			403, "method_not_public", `method "apply"`},
		{"preview render", job(`{"pipeline": "preview", "method": "render.factor"}`), 403, "method_not_public", `plugin "preview" is of kind "preview"`},
		{"pipeline unknown method", job(`{"pipeline": "test-pipeline", "method": "walk"}`), 400, "bad_request", `serves no method "walk"`},
		{"pipeline run", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "step_ms": 1}, "preview": {"method": "none"}}`), 201, "", ""},
		// params.model_dir is a folder the pipeline reads: confined like a model path.
		{"model_dir outside", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "model_dir": "/etc"}, "preview": {"method": "none"}}`),
			400, "bad_path", `params.model_dir`},
		{"model_dir climbing", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "model_dir": "../../.."}, "preview": {"method": "none"}}`),
			400, "bad_path", `is not allowed`},
		{"model_dir not a string", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "model_dir": 7}, "preview": {"method": "none"}}`),
			400, "bad_request", `params.model_dir: 7 is not a string`},
		// model_file and tokenizer_dir (a bundled single file's tokenizers) are read by the pipeline too.
		{"model_file outside", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "model_file": "/etc/passwd"}, "preview": {"method": "none"}}`),
			400, "bad_path", `params.model_file`},
		{"tokenizer_dir outside", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "tokenizer_dir": "/etc"}, "preview": {"method": "none"}}`),
			400, "bad_path", `params.tokenizer_dir`},
		{"tokenizer_dir not a string", job(`{"pipeline": "test-pipeline", "params": {"steps": 2, "tokenizer_dir": ["x"]}, "preview": {"method": "none"}}`),
			400, "bad_request", `params.tokenizer_dir: [x] is not a string`},
	}, 5*time.Second)
	// The manifest's public methods show in /v1/plugins.
	_, b, _ := f.do(t, call{method: "GET", path: "/v1/plugins"})
	var ps []v1.PluginStatus
	mustJSON(t, b, &ps)
	for _, p := range ps {
		for _, m := range p.Methods {
			if want := p.Kind == "pipeline" && m.Name == "run"; m.Public != want {
				t.Errorf("plugin %s method %s: public %v, want %v", p.Name, m.Name, m.Public, want)
			}
		}
		if p.CrashLimit != plugin.DefaultCrashLimit || p.CrashWindowSeconds != plugin.DefaultCrashWindow.Seconds() {
			t.Errorf("plugin %s: crash budget %d in %vs not shown", p.Name, p.CrashLimit, p.CrashWindowSeconds)
		}
	}
	// Nothing leaked into the arena or the LoRA state.
	if _, b, _ = f.do(t, call{method: "GET", path: "/v1/loras/state"}); strings.Contains(string(b), "secret") {
		t.Fatalf("LoRA state after refused jobs: %s", b)
	}
}

// TestAbuseHostsAndOrigins: a rebinding page (foreign Host) reaches no
// route; a mutating request or websocket from a foreign origin is refused,
// whatever its Host says.
func TestAbuseHostsAndOrigins(t *testing.T) {
	f := abuseFixture(t, Options{AllowedHosts: []string{"arenahost.lan", "proxy.lan:8443"}})
	u, _ := url.Parse(f.srv.URL)
	port := u.Port()
	self := "http://127.0.0.1:" + port
	h := func(kv ...string) map[string]string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	load := `{"path": "` + samples.ModelFile + `", "name": "again"}`
	f.run(t, []abuseCase{
		{"read with a rebinding Host", call{method: "GET", path: "/v1/models", header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", `Host "evil.example:`},
		{"console with a rebinding Host", call{method: "GET", path: "/", header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", "--allowed-hosts"},
		{"websocket with a rebinding Host", call{method: "GET", path: "/ws", header: h("Host", "evil.example:"+port, "Upgrade", "websocket", "Connection", "Upgrade")}, 403, "host_not_allowed", ""},
		{"unload with rebinding Host and matching Origin", call{method: "DELETE", path: "/v1/models/x",
			header: h("Host", "evil.example:"+port, "Origin", "http://evil.example:"+port)}, 403, "host_not_allowed", ""},
		{"load from a foreign origin", call{method: "POST", path: "/v1/models", body: load, header: h("Origin", "http://evil.example")}, 403, "cross_origin", "evil.example"},
		{"load from another local port", call{method: "POST", path: "/v1/models", body: load, header: h("Origin", "http://localhost:1")}, 403, "cross_origin", "port 1"},
		{"load from a null origin", call{method: "POST", path: "/v1/models", body: load, header: h("Origin", "null")}, 403, "cross_origin", "not an http(s) origin"},
		{"websocket from a foreign origin", call{method: "GET", path: "/ws", header: h("Upgrade", "websocket", "Connection", "Upgrade", "Origin", "http://evil.example")}, 403, "cross_origin", ""},
		{"trailing-dot loopback name", call{method: "GET", path: "/v1/health", header: h("Host", "LOCALHOST.:"+port)}, 200, "", ""},
		{"allowed extra name", call{method: "GET", path: "/v1/health", header: h("Host", "arenahost.lan:"+port)}, 200, "", ""},
		{"allowed name with the wrong port", call{method: "GET", path: "/v1/health", header: h("Host", "proxy.lan:1")}, 403, "host_not_allowed", ""},
		{"allowed name with its port", call{method: "GET", path: "/v1/health", header: h("Host", "proxy.lan:8443")}, 200, "", ""},
		{"own origin", call{method: "POST", path: "/v1/models", body: load, header: h("Origin", self)}, 201, "", ""},
		// ComfyUI's routes and frontend and the console sit behind the same guard.
		{"comfy prompt with a rebinding Host", call{method: "POST", path: "/prompt", body: `{"prompt": {}}`, header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", ""},
		{"comfy api read with a rebinding Host", call{method: "GET", path: "/api/queue", header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", ""},
		{"comfy frontend with a rebinding Host", call{method: "GET", path: "/comfy/", header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", ""},
		{"console api with a rebinding Host", call{method: "GET", path: "/v1/arena", header: h("Host", "evil.example:"+port)}, 403, "host_not_allowed", ""},
		{"comfy prompt from a foreign origin", call{method: "POST", path: "/prompt", body: `{"prompt": {}}`, header: h("Origin", "http://evil.example")}, 403, "cross_origin", ""},
		{"comfy api prompt from another local port", call{method: "POST", path: "/api/prompt", body: `{"prompt": {}}`, header: h("Origin", "http://localhost:1")}, 403, "cross_origin", ""},
		{"comfy websocket from a foreign origin", call{method: "GET", path: "/comfy/ws", header: h("Upgrade", "websocket", "Connection", "Upgrade", "Origin", "http://evil.example")}, 403, "cross_origin", ""},
		{"comfy prompt from its own page (past the guard: ComfyUI's own 400)", call{method: "POST", path: "/comfy/api/prompt", body: `{"prompt": {}}`, header: h("Origin", self)}, 400, "", ""},
	}, 5*time.Second)
}

// writeHuge writes a copy of the kohya sample LoRA whose factors hold
// huge but finite values (bf16 3e38): finite on disk, infinite once
// multiplied.
func writeHuge(t *testing.T, src, dst string) {
	t.Helper()
	in, err := safetensors.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var ts []safetensors.WriteTensor
	for _, info := range in.Tensors {
		b, err := in.TensorData(info)
		if err != nil {
			t.Fatal(err)
		}
		b = append([]byte(nil), b...)
		if strings.Contains(info.Name, "lora_") {
			for i := 0; i < len(b); {
				switch info.DType {
				case safetensors.BF16:
					b[i], b[i+1] = 0x62, 0x7f // 3.0e38
					i += 2
				case safetensors.F16:
					b[i], b[i+1] = 0xff, 0x7b // 65504
					i += 2
				case safetensors.F32:
					v := math.Float32bits(3e38)
					b[i], b[i+1], b[i+2], b[i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
					i += 4
				default:
					t.Fatalf("tensor %s: dtype %s", info.Name, info.DType)
				}
			}
		}
		ts = append(ts, safetensors.WriteTensor{Name: info.Name, DType: info.DType, Shape: info.Shape, Data: b})
	}
	if err := safetensors.WriteFile(dst, in.Metadata, ts); err != nil {
		t.Fatal(err)
	}
}

// writeNaNModel writes a sample model (nested or not) whose first F32
// quant-state tensor named *suffix holds a NaN, and returns that tensor's
// name.
func writeNaNModel(t *testing.T, path string, nested bool, suffix string) string {
	t.Helper()
	clean := filepath.Join(t.TempDir(), "clean.safetensors")
	if err := samples.WriteModel(clean, samples.ModelOptions{Nested: nested}); err != nil {
		t.Fatal(err)
	}
	in, err := safetensors.Open(clean)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	var ts []safetensors.WriteTensor
	poisoned := ""
	for _, info := range in.Tensors {
		b, err := in.TensorData(info)
		if err != nil {
			t.Fatal(err)
		}
		b = append([]byte(nil), b...)
		if poisoned == "" && info.DType == safetensors.F32 && strings.HasSuffix(info.Name, suffix) {
			v := math.Float32bits(float32(math.NaN()))
			b[4], b[5], b[6], b[7] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
			poisoned = info.Name
		}
		ts = append(ts, safetensors.WriteTensor{Name: info.Name, DType: info.DType, Shape: info.Shape, Data: b})
	}
	if poisoned == "" {
		t.Fatalf("no F32 tensor *%s in the sample model", suffix)
	}
	if err := safetensors.WriteFile(path, in.Metadata, ts); err != nil {
		t.Fatal(err)
	}
	return poisoned
}

// TestAbuseFiles: FIFOs, devices, sockets, directories, symlink loops and
// over-long names are 400 bad_path within a second, for model loads and
// LoRA applies alike; the listing skips them without hanging.
func TestAbuseFiles(t *testing.T) {
	f := abuseFixture(t, Options{})
	models, loras := filepath.Join(f.data, "models"), filepath.Join(f.data, "loras")
	for _, d := range []string{models, loras} {
		if err := syscall.Mkfifo(filepath.Join(d, "fifo.safetensors"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(filepath.Join(d, "dir.safetensors"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("loop.safetensors", filepath.Join(d, "loop.safetensors")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/dev/zero", filepath.Join(d, "zero.safetensors")); err != nil {
			t.Fatal(err)
		}
	}
	long := strings.Repeat("n", 5000)
	load := func(p string) call {
		b, _ := json.Marshal(map[string]string{"path": p, "name": "x"})
		return call{method: "POST", path: "/v1/models", body: string(b)}
	}
	apply := func(name, mode string) call {
		b, _ := json.Marshal(map[string]any{"loras": []map[string]any{{"name": name}}, "mode": mode})
		return call{method: "POST", path: "/v1/loras/apply", body: string(b)}
	}
	f.run(t, []abuseCase{
		{"model fifo", load("fifo.safetensors"), 400, "bad_path", "FIFO"},
		// A directory is a diffusers model folder (issue 16); this one holds no weights.
		{"model directory without weights", load("dir.safetensors"), 400, "bad_model", "no weights in"},
		{"model symlink loop", load("loop.safetensors"), 400, "bad_path", "loop.safetensors"},
		{"model device via symlink", load("zero.safetensors"), 400, "bad_path", "outside"},
		{"model long name", load(long + ".safetensors"), 400, "bad_path", "longer than"},
		{"model long component", load(strings.Repeat("m", 300) + ".safetensors"), 400, "bad_path", "mmm"},
		{"model /dev/zero", load("/dev/zero"), 400, "bad_path", "outside"},
		{"lora fifo side", apply("fifo", "side"), 400, "bad_path", "FIFO"},
		{"lora fifo fuse", apply("fifo", "fuse"), 400, "bad_path", "FIFO"},
		{"lora directory", apply("dir", "side"), 400, "bad_path", "directory"},
		{"lora symlink loop", apply("loop", "side"), 400, "bad_path", "loop"},
		{"lora long name", apply(long, "side"), 400, "bad_path", "longer than"},
		{"lora list skips specials", call{method: "GET", path: "/v1/loras"}, 200, "", ""},
		{"sdapi list skips specials", call{method: "GET", path: "/sdapi/v1/loras"}, 200, "", ""},
	}, time.Second)
}

// TestAbuseNonFinite: a model whose quant state holds a NaN is refused at
// load naming the tensor; huge strengths are 400; a fuse whose result
// would be infinite is 422 naming the layer and leaves the model
// byte-exact; the state stays JSON throughout.
func TestAbuseNonFinite(t *testing.T) {
	f := abuseFixture(t, Options{})
	models, loras := filepath.Join(f.data, "models"), filepath.Join(f.data, "loras")
	plainBad := writeNaNModel(t, filepath.Join(models, "nan-absmax.safetensors"), false, ".absmax")
	nestedBad := writeNaNModel(t, filepath.Join(models, "nan-nested.safetensors"), true, ".nested_absmax")
	writeHuge(t, filepath.Join(loras, samples.KohyaLoRAFile), filepath.Join(loras, "huge.safetensors"))
	kohya := strings.TrimSuffix(samples.KohyaLoRAFile, ".safetensors")
	model := f.s.Registry.Models()[0].Name
	_, before, _ := f.do(t, call{method: "GET", path: "/v1/models/" + model + "/digest"})
	strength := func(s string, mode string) call {
		return call{method: "POST", path: "/v1/loras/apply", body: `{"loras": [{"name": "` + kohya + `", "strength": ` + s + `}], "mode": "` + mode + `"}`}
	}
	f.run(t, []abuseCase{
		{"nan absmax", call{method: "POST", path: "/v1/models", body: `{"path": "nan-absmax.safetensors"}`}, 400, "bad_model", plainBad},
		{"nan nested absmax", call{method: "POST", path: "/v1/models", body: `{"path": "nan-nested.safetensors"}`}, 400, "bad_model", nestedBad},
		{"strength 1e308 fuse", strength("1e308", "fuse"), 400, "bad_request", "strength"},
		{"strength -1e308 side", strength("-1e308", "side"), 400, "bad_request", "strength"},
		{"strength 101", strength("101", "fuse"), 400, "bad_request", "strength"},
		{"strength overflowing JSON", strength("1e400", "fuse"), 400, "bad_request", ""},
		{"huge values fuse", call{method: "POST", path: "/v1/loras/apply", body: `{"loras": [{"name": "huge"}], "mode": "fuse"}`}, 422, "bad_lora", "not finite"},
		{"state after refused fuse", call{method: "GET", path: "/v1/loras/state"}, 200, "", ""},
		{"digest after refused fuse", call{method: "GET", path: "/v1/models/" + model + "/digest"}, 200, "", ""},
	}, 30*time.Second)
	_, after, _ := f.do(t, call{method: "GET", path: "/v1/models/" + model + "/digest"})
	var d0, d1 v1.ModelDigest
	mustJSON(t, before, &d0)
	mustJSON(t, after, &d1)
	if d0.SHA256 == "" || d0.SHA256 != d1.SHA256 {
		t.Fatalf("model digest changed by a refused fuse: %s → %s", d0.SHA256, d1.SHA256)
	}
	if _, b, _ := f.do(t, call{method: "GET", path: "/v1/models"}); strings.Contains(string(b), "nan-") {
		t.Fatalf("a NaN model was loaded: %s", b)
	}
}

// TestAbuseBodiesAndLimits: non-object bodies are 400 and change nothing
// (a null apply must not remove the LoRAs); image counts cannot overflow.
func TestAbuseBodiesAndLimits(t *testing.T) {
	f := abuseFixture(t, Options{MaxImages: 4})
	kohya := strings.TrimSuffix(samples.KohyaLoRAFile, ".safetensors")
	f.run(t, []abuseCase{
		{"apply a LoRA", call{method: "POST", path: "/v1/loras/apply", body: `{"loras": [{"name": "` + kohya + `"}]}`}, 200, "", ""},
	}, 30*time.Second)
	var cases []abuseCase
	for _, route := range []string{"/v1/loras/apply", "/v1/models", "/v1/jobs"} {
		for _, body := range []string{"null", "[]", `"x"`, "1", "true", " ", `{"loras": []} {}`, `{`} {
			cases = append(cases, abuseCase{fmt.Sprintf("%s %q", route, body), call{method: "POST", path: route, body: body}, 400, "bad_request", "request body"})
		}
	}
	for _, body := range []string{"null", "[]", `"x"`, "1", " "} {
		cases = append(cases,
			abuseCase{fmt.Sprintf("a1111 options %q", body), call{method: "POST", path: "/sdapi/v1/options", body: body}, 400, "bad_request", "request body"},
			abuseCase{fmt.Sprintf("comfy prompt %q", body), call{method: "POST", path: "/prompt", body: body}, 400, "", ""},
		)
		if body != " " { // ComfyUI's clients post empty bodies to /queue
			cases = append(cases, abuseCase{fmt.Sprintf("comfy queue %q", body), call{method: "POST", path: "/api/queue", body: body, header: map[string]string{"Content-Type": "application/json"}}, 400, "", ""})
		}
	}
	cases = append(cases,
		abuseCase{"apply without loras", call{method: "POST", path: "/v1/loras/apply", body: `{}`}, 400, "bad_request", "loras: required"},
		abuseCase{"apply with null loras", call{method: "POST", path: "/v1/loras/apply", body: `{"loras": null}`}, 400, "bad_request", "loras: required"},
		abuseCase{"txt2img overflow", call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "x", "batch_size": 4611686018427387904, "n_iter": 4}`}, 400, "bad_request", "at most 4"},
		abuseCase{"txt2img negative", call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "x", "batch_size": -3, "n_iter": -3}`}, 400, "bad_request", "negative"},
		abuseCase{"txt2img over the limit", call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "x", "batch_size": 5}`}, 400, "bad_request", "at most 4"},
	)
	f.run(t, cases, 5*time.Second)
	_, b, _ := f.do(t, call{method: "GET", path: "/v1/loras/state"})
	if !strings.Contains(string(b), kohya) {
		t.Fatalf("a refused body removed the LoRAs: %s", b)
	}
}

// killUntil SIGKILLs plugin name's process until its state is want.
func killUntil(t *testing.T, f *fixture, name string, want v1.PluginState) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		st, err := f.s.Plugins.PluginStatus(name)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == want {
			return
		}
		if st.State == v1.PluginServing && st.PID > 0 {
			_ = syscall.Kill(st.PID, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("plugin %s never reached %s", name, want)
}

// TestAbusePluginOutages: a pipeline that is down is 503
// plugin_unavailable with Retry-After, never a 4xx; a job runs to the end
// without previews while the preview plugin is down; a reload resets the
// crash budget.
func TestAbusePluginOutages(t *testing.T) {
	f := abuseFixture(t, Options{})
	killUntil(t, f, "test-pipeline", v1.PluginFailed)
	c := call{method: "POST", path: "/v1/jobs", body: `{"pipeline": "test-pipeline", "params": {"steps": 2, "step_ms": 1}}`}
	status, b, h := f.do(t, c)
	if status != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
		t.Fatalf("job on a failed pipeline: %d %s (Retry-After %q)", status, b, h.Get("Retry-After"))
	}
	wantError(t, c, status, b, "plugin_unavailable", `pipeline "test-pipeline" is failed`)
	st, _ := f.s.Plugins.PluginStatus("test-pipeline")
	if st.Crashes < st.CrashLimit {
		t.Fatalf("failed with %d crashes of a budget of %d", st.Crashes, st.CrashLimit)
	}
	if status, b, _ = f.do(t, call{method: "POST", path: "/v1/plugins/test-pipeline/reload"}); status != http.StatusOK {
		t.Fatalf("reload: %d %s", status, b)
	}
	if st, _ = f.s.Plugins.PluginStatus("test-pipeline"); st.State != v1.PluginServing || st.Crashes != 0 {
		t.Fatalf("after reload: %s with %d crashes", st.State, st.Crashes)
	}

	// The LoRA plugin down: applies are 503 too, and the model is untouched.
	killUntil(t, f, "lora-nf4", v1.PluginFailed)
	kohya := strings.TrimSuffix(samples.KohyaLoRAFile, ".safetensors")
	for _, mode := range []string{"side", "fuse"} {
		c = call{method: "POST", path: "/v1/loras/apply", body: `{"loras": [{"name": "` + kohya + `"}], "mode": "` + mode + `"}`}
		status, b, h = f.do(t, c)
		if status != http.StatusServiceUnavailable || h.Get("Retry-After") == "" {
			t.Fatalf("%s apply with lora-nf4 failed: %d %s (Retry-After %q)", mode, status, b, h.Get("Retry-After"))
		}
		wantError(t, c, status, b, "plugin_unavailable", "lora-nf4")
	}
	if status, b, _ = f.do(t, call{method: "GET", path: "/v1/loras/state"}); status != http.StatusOK || strings.Contains(string(b), kohya) {
		t.Fatalf("state after refused applies: %d %s", status, b)
	}

	killUntil(t, f, "preview", v1.PluginFailed)
	id := f.createJob(t, `{"pipeline": "test-pipeline", "params": {"steps": 5, "step_ms": 5}}`)
	s := f.waitJob(t, id)
	if s.State != "done" || s.Preview.Rendered != 0 || s.Preview.Published == 0 || s.Preview.Dropped != s.Preview.Published {
		t.Fatalf("job with the preview plugin down: %+v", s)
	}
	c = call{method: "GET", path: "/v1/jobs/" + id + "/preview.jpg"}
	status, b, _ = f.do(t, c)
	wantError(t, c, status, b, "no_frame", "")
}
