package comfyui

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"io"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// fakeCore stands in for arenahost's services so the translator's logic
// (validation, queue, history, websocket delivery) is tested alone; the
// Python client tests (tests/clients) run it over a real host.
type fakeCore struct {
	mu      sync.Mutex
	applied [][]LoRA
	release chan struct{} // when set, Sample waits for it (or the context)
	fail    error         // when set, Sample fails with it
}

func (f *fakeCore) Checkpoints() ([]string, error) { return []string{"model.safetensors"}, nil }
func (f *fakeCore) LoadCheckpoint(_ context.Context, name string) (string, error) {
	if name != "model.safetensors" {
		return "", fmt.Errorf("no checkpoint %q", name)
	}
	return "sample", nil
}
func (f *fakeCore) LoRAs() ([]string, error) {
	return []string{"a.safetensors", "sub/b.safetensors"}, nil
}
func (f *fakeCore) Sample(ctx context.Context, s Sampling, ev Events) (image.Image, error) {
	f.mu.Lock()
	f.applied = append(f.applied, s.LoRAs)
	f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	for i := 1; i <= 2; i++ {
		ev.Progress(i, 2)
		if ev.Frame != nil {
			ev.Frame("jpeg", []byte{0xff, 0xd8, byte(i)})
		}
	}
	if f.release != nil {
		select {
		case <-f.release:
		case <-ctx.Done():
			return nil, ErrInterrupted
		}
	}
	img := image.NewNRGBA(image.Rect(0, 0, s.Width, s.Height))
	img.Set(0, 0, color.NRGBA{R: 200, A: 255})
	return img, nil
}
func (f *fakeCore) Free(context.Context) error { return nil }
func (f *fakeCore) Stats() Stats {
	return Stats{RAMTotal: 8 << 30, RAMFree: 4 << 30, Device: "arena", DeviceType: "cpu", DeviceTotal: 1 << 30, DeviceFree: 1 << 29}
}

func newTestServer(t *testing.T, core Core) (*Server, *httptest.Server) {
	t.Helper()
	s, err := New(core, Options{Dir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	mux := http.NewServeMux()
	s.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return s, srv
}

func graph(extra map[string]any) map[string]any {
	g := map[string]any{
		"1": map[string]any{"class_type": "UNETLoader", "inputs": map[string]any{"unet_name": "model.safetensors", "weight_dtype": "default"}},
		"2": map[string]any{"class_type": "LoraLoaderModelOnly", "inputs": map[string]any{"model": []any{"1", 0}, "lora_name": "sub/b.safetensors", "strength_model": 0.5}},
		"3": map[string]any{"class_type": "EmptySD3LatentImage", "inputs": map[string]any{"width": 64, "height": 32, "batch_size": 2}},
		"4": map[string]any{"class_type": "CLIPTextEncode", "inputs": map[string]any{"text": "a cat", "clip": []any{"8", 1}}},
		"5": map[string]any{"class_type": "KSampler", "inputs": map[string]any{"model": []any{"2", 0}, "seed": 1, "steps": 2, "cfg": 1, "sampler_name": "euler",
			"scheduler": "simple", "positive": []any{"4", 0}, "negative": []any{"4", 0}, "latent_image": []any{"3", 0}, "denoise": 1}},
		"6": map[string]any{"class_type": "VAEDecode", "inputs": map[string]any{"samples": []any{"5", 0}, "vae": []any{"8", 2}}},
		"7": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"6", 0}, "filename_prefix": "t"}},
		"8": map[string]any{"class_type": "CheckpointLoaderSimple", "inputs": map[string]any{"ckpt_name": "model.safetensors"}},
	}
	for k, v := range extra {
		if v == nil {
			delete(g, k)
		} else {
			g[k] = v
		}
	}
	return g
}

func post(t *testing.T, url string, body any) (int, map[string]any) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("POST %s: %d %s", url, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode, out
}

func get(t *testing.T, url string, v any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if v != nil {
		if err := json.Unmarshal(raw, v); err != nil {
			t.Fatalf("GET %s: %d %s", url, resp.StatusCode, raw)
		}
	}
	return resp.StatusCode
}

func TestValidation(t *testing.T) {
	_, srv := newTestServer(t, &fakeCore{})
	for _, tt := range []struct {
		name       string
		body       any
		status     int
		errType    string
		nodeErrors string // "id:type" of the first node error, if any
	}{
		{"unknown node", map[string]any{"prompt": graph(map[string]any{"9": map[string]any{"class_type": "UpscaleModelLoader", "inputs": map[string]any{}}})}, 400, "missing_node_type", ""},
		{"no class_type", map[string]any{"prompt": graph(map[string]any{"9": map[string]any{"inputs": map[string]any{}}})}, 400, "invalid_prompt", ""},
		{"no prompt", map[string]any{"client_id": "x"}, 400, "no_prompt", ""},
		{"not an object", map[string]any{"prompt": []any{1}}, 400, "invalid_prompt", ""},
		{"no outputs", map[string]any{"prompt": graph(map[string]any{"7": nil})}, 400, "prompt_no_outputs", ""},
		{"bad prompt_id", map[string]any{"prompt": graph(nil), "prompt_id": "x"}, 400, "invalid_prompt_id", ""},
		{"missing input", map[string]any{"prompt": graph(map[string]any{"4": map[string]any{"class_type": "CLIPTextEncode", "inputs": map[string]any{"clip": []any{"8", 1}}}})},
			400, "prompt_outputs_failed_validation", "4:required_input_missing"},
		{"sampler not in list", map[string]any{"prompt": graph(map[string]any{"5": map[string]any{"class_type": "KSampler", "inputs": map[string]any{"model": []any{"2", 0}, "seed": 1,
			"steps": 2, "cfg": 1, "sampler_name": "dpmpp_2m", "scheduler": "simple", "positive": []any{"4", 0}, "negative": []any{"4", 0}, "latent_image": []any{"3", 0}, "denoise": 1}}})},
			400, "prompt_outputs_failed_validation", "5:value_not_in_list"},
		{"type mismatch", map[string]any{"prompt": graph(map[string]any{"6": map[string]any{"class_type": "VAEDecode", "inputs": map[string]any{"samples": []any{"5", 0}, "vae": []any{"8", 1}}}})},
			400, "prompt_outputs_failed_validation", "6:return_type_mismatch"},
		{"size not a multiple of 16", map[string]any{"prompt": graph(map[string]any{"3": map[string]any{"class_type": "EmptyLatentImage", "inputs": map[string]any{"width": 65, "height": 32, "batch_size": 1}}})},
			400, "prompt_outputs_failed_validation", "3:custom_validation_failed"},
		{"one good output of two", map[string]any{"prompt": graph(map[string]any{"9": map[string]any{"class_type": "PreviewImage", "inputs": map[string]any{"images": []any{"77", 0}}}})},
			200, "", "9:bad_linked_input"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			status, out := post(t, srv.URL+"/prompt", tt.body)
			if status != tt.status {
				t.Fatalf("status %d, want %d: %v", status, tt.status, out)
			}
			if tt.errType != "" {
				e, _ := out["error"].(map[string]any)
				if e["type"] != tt.errType {
					t.Fatalf("error %v, want type %s", out["error"], tt.errType)
				}
				if tt.errType == "missing_node_type" && (!strings.Contains(e["message"].(string), "UpscaleModelLoader") || e["extra_info"].(map[string]any)["class_type"] != "UpscaleModelLoader") {
					t.Fatalf("missing_node_type does not name the node: %v", e)
				}
			}
			if tt.nodeErrors != "" {
				id, typ, _ := strings.Cut(tt.nodeErrors, ":")
				ne, _ := out["node_errors"].(map[string]any)[id].(map[string]any)
				errs, _ := ne["errors"].([]any)
				if len(errs) == 0 || errs[0].(map[string]any)["type"] != typ {
					t.Fatalf("node_errors %v, want %s on node %s", out["node_errors"], typ, id)
				}
			}
		})
	}
}

// wsClient dials /ws and collects messages.
type testWS struct {
	c    *websocket.Conn
	text []map[string]any
	bin  [][]byte
}

func dial(t *testing.T, srv *httptest.Server, query string, flags map[string]any) *testWS {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?"+query, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseNow() })
	if flags != nil {
		b, _ := json.Marshal(map[string]any{"type": "feature_flags", "data": flags})
		if err := c.Write(ctx, websocket.MessageText, b); err != nil {
			t.Fatal(err)
		}
	}
	return &testWS{c: c}
}

// until reads until a text message of type typ arrives.
func (w *testWS) until(t *testing.T, typ string) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		mt, b, err := w.c.Read(ctx)
		if err != nil {
			t.Fatalf("waiting for %s: %v (have %v)", typ, err, w.text)
		}
		if mt == websocket.MessageBinary {
			w.bin = append(w.bin, b)
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		w.text = append(w.text, m)
		if m["type"] == typ {
			return m
		}
	}
}

func (w *testWS) types() []string {
	var out []string
	for _, m := range w.text {
		out = append(out, m["type"].(string))
	}
	return out
}

func TestRunAndWebsocket(t *testing.T) {
	core := &fakeCore{}
	_, srv := newTestServer(t, core)
	frontend := dial(t, srv, "clientId=ui", map[string]any{"supports_preview_metadata": true})
	frontend.until(t, "feature_flags")
	api := dial(t, srv, "clientId=api", nil)
	api.until(t, "status")
	legacy := dial(t, srv, "clientId=old&previews=1", nil)
	legacy.until(t, "status")

	for _, c := range []struct {
		ws     *testWS
		client string
		want   int // binary event type; 0: none
	}{{frontend, "ui", 4}, {api, "api", 0}, {legacy, "old", 1}} {
		status, out := post(t, srv.URL+"/api/prompt", map[string]any{"prompt": graph(nil), "client_id": c.client})
		if status != 200 || out["prompt_id"] == nil {
			t.Fatalf("prompt: %d %v", status, out)
		}
		id := out["prompt_id"].(string)
		for {
			m := c.ws.until(t, "executing")
			if d := m["data"].(map[string]any); d["node"] == nil && d["prompt_id"] == id {
				break
			}
		}
		types := strings.Join(c.ws.types(), ",")
		for _, want := range []string{"execution_start", "executing", "progress", "executed", "execution_success"} {
			if !strings.Contains(types, want) {
				t.Fatalf("%s: messages %s lack %s", c.client, types, want)
			}
		}
		switch {
		case c.want == 0 && len(c.ws.bin) > 0:
			t.Fatalf("%s never asked for previews but got %d", c.client, len(c.ws.bin))
		case c.want != 0 && len(c.ws.bin) != 4: // 2 steps × batch 2
			t.Fatalf("%s: %d previews, want 4", c.client, len(c.ws.bin))
		}
		for _, b := range c.ws.bin {
			if ev := binary.BigEndian.Uint32(b); int(ev) != c.want {
				t.Fatalf("%s: binary event %d, want %d", c.client, ev, c.want)
			}
			if c.want == 4 {
				n := binary.BigEndian.Uint32(b[4:])
				var md map[string]any
				if err := json.Unmarshal(b[8:8+n], &md); err != nil || md["node_id"] != "5" || md["prompt_id"] != id || md["image_type"] != "image/jpeg" {
					t.Fatalf("metadata %s: %v", b[8:8+n], err)
				}
			}
		}
		var hist map[string]map[string]any
		get(t, srv.URL+"/history/"+id, &hist)
		h := hist[id]
		st := h["status"].(map[string]any)
		imgs := h["outputs"].(map[string]any)["7"].(map[string]any)["images"].([]any)
		if st["status_str"] != "success" || st["completed"] != true || len(imgs) != 2 || len(h["prompt"].([]any)) != 5 {
			t.Fatalf("history %v", h)
		}
		f := imgs[0].(map[string]any)
		resp, err := http.Get(srv.URL + "/view?filename=" + f["filename"].(string) + "&type=output")
		if err != nil || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "image/png" {
			t.Fatalf("view: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	core.mu.Lock()
	if len(core.applied) != 6 || len(core.applied[0]) != 1 || core.applied[0][0] != (LoRA{Name: "sub/b.safetensors", Strength: 0.5, Mode: "side"}) {
		t.Fatalf("LoRAs applied %v", core.applied)
	}
	core.mu.Unlock()
	for _, q := range []string{"filename=../../etc/passwd", "filename=x&subfolder=../..", "filename=x&type=secret"} {
		if resp, err := http.Get(srv.URL + "/view?" + q); err != nil || resp.StatusCode != 400 {
			t.Fatalf("view %s: %v %v", q, resp, err)
		}
	}
}

func TestQueueInterruptAndUpload(t *testing.T) {
	core := &fakeCore{release: make(chan struct{})}
	_, srv := newTestServer(t, core)
	_, first := post(t, srv.URL+"/prompt", map[string]any{"prompt": graph(nil)})
	var ids []string
	for range 2 {
		_, out := post(t, srv.URL+"/prompt", map[string]any{"prompt": graph(nil)})
		ids = append(ids, out["prompt_id"].(string))
	}
	var q struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	deadline := time.Now().Add(10 * time.Second)
	for get(t, srv.URL+"/queue", &q); len(q.Running) == 0; get(t, srv.URL+"/queue", &q) {
		if time.Now().After(deadline) {
			t.Fatal("nothing runs")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(q.Running[0]) != 5 || q.Running[0][1] != first["prompt_id"] || len(q.Pending) != 2 || q.Pending[0][1] != ids[0] {
		t.Fatalf("queue %+v", q)
	}
	// Form bodies too (comfy-catapult sends them).
	resp, err := http.Post(srv.URL+"/queue", "application/x-www-form-urlencoded", strings.NewReader("delete="+ids[0]+"&clear=False"))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("delete: %v %v", resp, err)
	}
	get(t, srv.URL+"/queue", &q)
	if len(q.Pending) != 1 || q.Pending[0][1] != ids[1] {
		t.Fatalf("after delete %+v", q)
	}
	if status, _ := post(t, srv.URL+"/queue", map[string]any{"clear": true}); status != 200 {
		t.Fatal(status)
	}
	var p map[string]map[string]int
	get(t, srv.URL+"/prompt", &p)
	if p["exec_info"]["queue_remaining"] != 1 {
		t.Fatalf("prompt info %v", p)
	}
	if status, _ := post(t, srv.URL+"/interrupt", map[string]any{}); status != 200 {
		t.Fatal(status)
	}
	id := first["prompt_id"].(string)
	var hist map[string]map[string]any
	for deadline := time.Now().Add(10 * time.Second); ; {
		get(t, srv.URL+"/history?max_items=5", &hist)
		if hist[id] != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no history")
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := hist[id]["status"].(map[string]any)
	msgs := st["messages"].([]any)
	if st["status_str"] != "error" || st["completed"] != false || msgs[len(msgs)-1].([]any)[0] != "execution_interrupted" || len(hist) != 1 {
		t.Fatalf("history %v", hist)
	}

	upload := func(name, content string) map[string]any {
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		fw, _ := mw.CreateFormFile("image", name)
		fw.Write([]byte(content))
		mw.WriteField("subfolder", "s")
		mw.Close()
		resp, err := http.Post(srv.URL+"/upload/image", mw.FormDataContentType(), &b)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("upload: %v %v", resp, err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return out
	}
	if r := upload("x.png", "one"); r["name"] != "x.png" || r["type"] != "input" || r["subfolder"] != "s" {
		t.Fatalf("upload %v", r)
	}
	if r := upload("x.png", "one"); r["name"] != "x.png" {
		t.Fatalf("same file again: %v", r)
	}
	if r := upload("x.png", "two"); r["name"] != "x (1).png" {
		t.Fatalf("different file, same name: %v", r)
	}
}

func TestFrontendRoutes(t *testing.T) {
	_, srv := newTestServer(t, &fakeCore{})
	var settings map[string]any
	get(t, srv.URL+"/comfy/api/settings", &settings)
	if settings["Comfy.TutorialCompleted"] != true || settings["Comfy.Notification.ShowVersionUpdates"] != false {
		t.Fatalf("settings %v", settings)
	}
	if status, _ := post(t, srv.URL+"/api/settings/Comfy.ColorPalette", "light"); status != 200 {
		t.Fatal(status)
	}
	if status, _ := post(t, srv.URL+"/api/settings", map[string]any{"Comfy.TutorialCompleted": false, "x": 1}); status != 200 {
		t.Fatal(status)
	}
	var v any
	get(t, srv.URL+"/api/settings/Comfy.ColorPalette", &v)
	get(t, srv.URL+"/api/settings", &settings)
	if v != "light" || settings["Comfy.TutorialCompleted"] != false || settings["x"] != float64(1) {
		t.Fatalf("settings after posts %v %v", v, settings)
	}
	var users map[string]any
	get(t, srv.URL+"/api/users", &users)
	if users["storage"] != "server" || users["migrated"] != true {
		t.Fatalf("users %v", users)
	}
	var list []any
	if get(t, srv.URL+"/api/userdata?dir=workflows", &list); len(list) != 0 {
		t.Fatalf("empty userdata %v", list)
	}
	req, _ := http.NewRequest("POST", srv.URL+"/api/userdata/workflows%2Fa.json", strings.NewReader(`{"nodes": []}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("post userdata: %v %v", resp, err)
	}
	resp.Body.Close()
	if get(t, srv.URL+"/api/userdata?dir=workflows", &list); len(list) != 1 || list[0] != "a.json" {
		t.Fatalf("userdata %v", list)
	}
	var wf map[string]any
	if get(t, srv.URL+"/api/userdata/workflows%2Fa.json", &wf); wf["nodes"] == nil {
		t.Fatalf("userdata file %v", wf)
	}
	for _, bad := range []string{"/api/userdata/..%2F..%2Fetc%2Fpasswd", "/api/userdata?dir=..%2F.."} {
		resp, err := http.Get(srv.URL + bad)
		if err != nil || resp.StatusCode != 403 {
			t.Fatalf("GET %s: %v %v", bad, resp, err)
		}
		resp.Body.Close()
	}
	var jobs struct {
		Jobs       []map[string]any `json:"jobs"`
		Pagination map[string]any   `json:"pagination"`
	}
	if get(t, srv.URL+"/api/jobs?status=in_progress,pending", &jobs); len(jobs.Jobs) != 0 || jobs.Pagination["total"] != float64(0) {
		t.Fatalf("jobs %+v", jobs)
	}
	if status := get(t, srv.URL+"/api/jobs?status=nope", nil); status != 400 {
		t.Fatalf("bad status filter: %d", status)
	}
	// Without the package, /comfy/ says how to install it.
	resp, err = http.Get(srv.URL + "/comfy/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(b), FrontendPackage) || !strings.Contains(string(b), "--comfy-frontend") {
		t.Fatalf("/comfy/ without the frontend: %d %s", resp.StatusCode, b)
	}
}

func TestExecutionError(t *testing.T) {
	_, srv := newTestServer(t, &fakeCore{fail: fmt.Errorf("pipeline job j-1 failed: out of arena")})
	ws := dial(t, srv, "clientId=e", nil)
	ws.until(t, "status")
	_, out := post(t, srv.URL+"/prompt", map[string]any{"prompt": graph(nil), "client_id": "e"})
	m := ws.until(t, "execution_error")
	d := m["data"].(map[string]any)
	if d["prompt_id"] != out["prompt_id"] || d["node_id"] != "5" || d["node_type"] != "KSampler" || !strings.Contains(d["exception_message"].(string), "out of arena") {
		t.Fatalf("execution_error %v", d)
	}
	id := out["prompt_id"].(string)
	var hist map[string]map[string]any
	for deadline := time.Now().Add(10 * time.Second); ; {
		get(t, srv.URL+"/history/"+id, &hist)
		if hist[id] != nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := hist[id]["status"].(map[string]any)
	if st["status_str"] != "error" || st["completed"] != false {
		t.Fatalf("history status %v", st)
	}
	var jobs struct {
		Jobs []map[string]any `json:"jobs"`
	}
	get(t, srv.URL+"/api/jobs?status=failed", &jobs)
	if len(jobs.Jobs) != 1 || jobs.Jobs[0]["id"] != id || jobs.Jobs[0]["execution_error"] == nil {
		t.Fatalf("jobs %v", jobs.Jobs)
	}
}
