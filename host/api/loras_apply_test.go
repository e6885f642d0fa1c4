package api

import (
	"bytes"
	"context"
	"encoding/json"
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
	"github.com/arenahost/arenahost/shared/samples"
)

// loraPlugins installs the lora-nf4 plugin (built once per test binary)
// into a plugins directory laid out as `make build` does.
func loraPlugins(t *testing.T) string {
	t.Helper()
	man, err := os.ReadFile("../../plugins/lora-nf4/plugin.json")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	testenv.InstallPlugin(t, dir, "lora-nf4", "./plugins/lora-nf4", string(man))
	return dir
}

func loraCall(t *testing.T, method, url string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequestWithContext(t.Context(), method, url, rd)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	raw, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s %s: body %q: %v", method, url, raw, err)
	}
	return resp.StatusCode, out
}

func TestLoRAApplyRoutes(t *testing.T) {
	data := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := server.New(t.Context(), server.Config{DataDir: data, PluginsDir: loraPlugins(t), Samples: true, ArenaCapacity: 1 << 30, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	// The sample LoRAs were written on first run, next to the sample model.
	for _, f := range []string{samples.KohyaLoRAFile, samples.PEFTLoRAFile} {
		if _, err := os.Stat(filepath.Join(s.Config().LoRAsDir, f)); err != nil {
			t.Fatalf("sample LoRA: %v", err)
		}
	}
	srv := httptest.NewServer(New(backendOf(s), log))
	t.Cleanup(srv.Close)
	kohya := strings.TrimSuffix(samples.KohyaLoRAFile, ".safetensors")

	code, body := loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{
		"loras": []map[string]any{{"name": kohya, "strength": 0.8}, {"name": samples.PEFTLoRAFile}}})
	if code != http.StatusOK || body["mode"] != "side" {
		t.Fatalf("apply: %d %v", code, body)
	}
	rep := body["report"].(map[string]any)
	for _, l := range rep["loras"].([]any) {
		if l.(map[string]any)["matched"].(float64) == 0 {
			t.Errorf("apply report: %v matched nothing", l)
		}
	}
	code, body = loraCall(t, "GET", srv.URL+"/v1/loras/state", nil)
	if code != http.StatusOK || body["mode"] != "side" || len(body["loras"].([]any)) != 2 {
		t.Fatalf("state: %d %v", code, body)
	}
	code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{
		"loras": []map[string]any{{"name": kohya, "strength": 0.8}, {"name": samples.PEFTLoRAFile}}})
	if code != http.StatusOK || body["noop"] != true {
		t.Errorf("re-apply: %d %v, want a no-op", code, body)
	}

	// factor_dtype: bf16 re-applies (half the side bytes) and shows in the
	// state; an unknown one, or one with a fused set, is 400 naming it.
	code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{"factor_dtype": "bf16",
		"loras": []map[string]any{{"name": kohya, "strength": 0.8}, {"name": samples.PEFTLoRAFile}}})
	if code != http.StatusOK || body["path"] != "apply" || body["factor_dtype"] != "bf16" {
		t.Fatalf("bf16 apply: %d %v", code, body)
	}
	if _, body = loraCall(t, "GET", srv.URL+"/v1/loras/state", nil); body["factor_dtype"] != "bf16" {
		t.Errorf("state after a bf16 apply: %v", body)
	}
	for _, bad := range []map[string]any{
		{"factor_dtype": "fp8", "loras": []map[string]any{{"name": kohya}}},
		{"factor_dtype": "bf16", "mode": "fuse", "loras": []map[string]any{{"name": kohya}}},
	} {
		code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", bad)
		if code != http.StatusBadRequest || !strings.Contains(body["detail"].(string), "factor_dtype") {
			t.Errorf("%v: %d %v, want 400 naming factor_dtype", bad, code, body)
		}
	}
	if _, body = loraCall(t, "GET", srv.URL+"/v1/loras/state", nil); body["factor_dtype"] != "bf16" || body["mode"] != "side" {
		t.Errorf("state after refused applies: %v", body)
	}

	// Paths stay inside the LoRA directory; bad files get 422 naming them.
	code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{"loras": []map[string]any{{"name": "../models/" + samples.ModelFile}}})
	if code != http.StatusBadRequest || body["code"] != "bad_path" {
		t.Errorf("escape: %d %v", code, body)
	}
	if err := os.WriteFile(filepath.Join(s.Config().LoRAsDir, "broken.safetensors"), []byte("\x10\x00\x00\x00\x00\x00\x00\x00{"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{"loras": []map[string]any{{"name": "broken"}}, "mode": "fuse"})
	if code != http.StatusUnprocessableEntity || body["code"] != "bad_lora" || !strings.Contains(body["detail"].(string), "broken.safetensors") {
		t.Errorf("broken file: %d %v", code, body)
	}
	if _, body = loraCall(t, "GET", srv.URL+"/v1/loras/state", nil); body["mode"] != "side" {
		t.Errorf("state after a failed apply: %v", body)
	}

	code, body = loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{"loras": []map[string]any{{"name": kohya}}, "mode": "fuse"})
	if code != http.StatusOK || body["mode"] != "fuse" || body["report"].(map[string]any)["retention"].(float64) <= 0 {
		t.Fatalf("fuse: %d %v", code, body)
	}
	code, body = loraCall(t, "DELETE", srv.URL+"/v1/loras", nil)
	if code != http.StatusOK || body["path"] != "remove" {
		t.Fatalf("remove: %d %v", code, body)
	}
	if _, body = loraCall(t, "GET", srv.URL+"/v1/loras/state", nil); body["mode"] != nil {
		t.Errorf("state after remove: %v", body)
	}
}

// TestUnloadFreesLoRAState: unloading a model with LoRAs applied frees its
// weights, its side factors and its bindings at once.
func TestUnloadFreesLoRAState(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := server.New(t.Context(), server.Config{DataDir: t.TempDir(), PluginsDir: loraPlugins(t), Samples: true, ArenaCapacity: 1 << 30, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	srv := httptest.NewServer(New(backendOf(s), log))
	t.Cleanup(srv.Close)
	if code, body := loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{
		"loras": []map[string]any{{"name": samples.KohyaLoRAFile}, {"name": samples.PEFTLoRAFile}}}); code != http.StatusOK {
		t.Fatalf("apply: %d %v", code, body)
	}
	if g, fs := s.Bindings.Current(server.DefaultModelName); g == 0 || len(fs) == 0 {
		t.Fatalf("no factors bound after apply")
	}
	if code, body := loraCall(t, "DELETE", srv.URL+"/v1/models/"+server.DefaultModelName, nil); code != http.StatusOK {
		t.Fatalf("unload: %d %v", code, body)
	}
	if g, fs := s.Bindings.Current(server.DefaultModelName); g != 0 || fs != nil {
		t.Errorf("bindings left after unload: generation %d, %d layers", g, len(fs))
	}
	if st := s.Arena.Stats(); st.Allocated != 0 {
		t.Errorf("arena holds %d bytes in %d regions after unloading the only model", st.Allocated, st.Regions)
	}
}
