package api

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/samples"
)

// TestResolveLoRA checks A1111's name rules: a path, else a unique bare
// name, else a unique alias.
func TestResolveLoRA(t *testing.T) {
	a := &API{opts: Options{LoRAsDir: "/loras"}}
	ls := []v1.LoRAFile{
		{Name: "top"},
		{Name: "sub/deep", Metadata: map[string]string{"ss_output_name": "deep-alias"}},
		{Name: "a/twin"}, {Name: "b/twin"},
		{Name: "x/one", Metadata: map[string]string{"ss_output_name": "shared"}},
		{Name: "y/two", Metadata: map[string]string{"ss_output_name": "shared"}},
	}
	for _, tt := range []struct{ tag, want, err string }{
		{"top", "top", ""},
		{"top.safetensors", "top", ""},
		{"sub/deep", "sub/deep", ""},
		{"deep", "sub/deep", ""},
		{"deep-alias", "sub/deep", ""},
		{"a/twin", "a/twin", ""},
		{"twin", "", "ambiguous: a/twin, b/twin"},
		{"shared", "", "ambiguous: x/one, y/two"},
		{"nope", "", `LoRA "nope"`},
	} {
		e, err := a.resolveLoRA(tt.tag, ls)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s: err %v, want %q", tt.tag, err, tt.err)
			}
			continue
		}
		if err != nil || e.Name != tt.want {
			t.Errorf("%s: %q, %v; want %q", tt.tag, e.Name, err, tt.want)
		}
	}
}

// TestA1111Routes drives the routes A1111 clients call before they
// generate, with A1111's field names, on a real server.
func TestA1111Routes(t *testing.T) {
	f := newFixture(t, txt2imgPlugins(t), Options{})
	get := func(path string, v any) {
		t.Helper()
		status, b, _ := f.do(t, call{method: "GET", path: path})
		if status != 200 {
			t.Fatalf("GET %s: %d %s", path, status, b)
		}
		mustJSON(t, b, v)
	}
	var models []map[string]any
	get("/sdapi/v1/sd-models", &models)
	if len(models) != 1 || models[0]["title"] != samples.ModelFile || models[0]["model_name"] != "flux-sample-nf4" || models[0]["arenahost_model"] != "sample" {
		t.Fatalf("sd-models %v", models)
	}
	for _, k := range []string{"title", "model_name", "hash", "sha256", "filename", "config"} {
		if _, ok := models[0][k]; !ok {
			t.Errorf("sd-models entry lacks %q", k)
		}
	}
	var opts map[string]any
	get("/sdapi/v1/options", &opts)
	if opts["sd_model_checkpoint"] != samples.ModelFile || opts[OptionStrict] != false {
		t.Fatalf("options %v", opts)
	}
	// Unknown keys are kept and echoed; the checkpoint is selected by title.
	if status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/options", body: `{"sd_model_checkpoint": "flux-sample-nf4.safetensors [abc]", "my_extension_key": [1, "x"], "samples_format": "jpg"}`}); status != 200 || strings.TrimSpace(string(b)) != "null" {
		t.Fatalf("set options: %d %s", status, b)
	}
	get("/sdapi/v1/options", &opts)
	if b, _ := json.Marshal(opts["my_extension_key"]); string(b) != `[1,"x"]` || opts["samples_format"] != "jpg" || opts["sd_model_checkpoint"] != samples.ModelFile {
		t.Fatalf("options after set %v", opts)
	}
	for _, tt := range []struct{ body, code, detail string }{
		{`{"sd_model_checkpoint": "missing.safetensors"}`, "not_found", `no checkpoint "missing.safetensors"`},
		{`{"sd_model_checkpoint": 3}`, "bad_request", "not a string"},
		{`{"arenahost_strict": "on"}`, "bad_request", "not a boolean"},
		{`[`, "bad_request", "read request body"},
	} {
		c := call{method: "POST", path: "/sdapi/v1/options", body: tt.body}
		status, b, _ := f.do(t, c)
		wantError(t, c, status, b, tt.code, tt.detail)
	}
	var samplers, schedulers []map[string]any
	get("/sdapi/v1/samplers", &samplers)
	get("/sdapi/v1/schedulers", &schedulers)
	if len(samplers) == 0 || samplers[0]["name"] != "Euler" || samplers[0]["aliases"] == nil || len(schedulers) == 0 || schedulers[0]["label"] == nil {
		t.Fatalf("samplers %v schedulers %v", samplers, schedulers)
	}
	for _, p := range []string{"/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/skip"} {
		if status, b, _ := f.do(t, call{method: "POST", path: p}); status != 200 {
			t.Fatalf("POST %s: %d %s", p, status, b)
		}
	}
	var mem struct {
		RAM  map[string]float64 `json:"ram"`
		CUDA struct {
			System map[string]float64 `json:"system"`
		} `json:"cuda"`
	}
	get("/sdapi/v1/memory", &mem)
	if mem.RAM["total"] <= 0 || mem.CUDA.System["total"] != 1<<30 || mem.CUDA.System["used"] <= 0 {
		t.Fatalf("memory %+v", mem)
	}

	// A LoRA in a subfolder answers to its bare name and its alias.
	src := filepath.Join(f.data, "loras", samples.KohyaLoRAFile)
	if err := os.MkdirAll(filepath.Join(f.data, "loras", "styles"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.data, "loras", "styles", "deep.safetensors"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/refresh-loras"}); status != 200 {
		t.Fatalf("refresh-loras: %d %s", status, b)
	}
	var loras []SDAPILoRA
	get("/sdapi/v1/loras", &loras)
	found := false
	for _, l := range loras {
		found = found || (l.Name == "deep" && strings.HasSuffix(l.Path, "styles/deep.safetensors"))
	}
	if !found {
		t.Fatalf("loras %+v lack styles/deep as \"deep\"", loras)
	}
	status, body, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "a cat <lora:deep:0.5>", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}`})
	if status != 200 {
		t.Fatalf("txt2img: %d %s", status, body)
	}
	var res Txt2ImgResponse
	mustJSON(t, body, &res)
	var info Txt2ImgInfo
	mustJSON(t, []byte(res.Info), &info)
	if len(info.LoRAs) != 1 || info.LoRAs[0].Name != "styles/deep" || len(info.Warnings) != 0 || info.SDModelName != "sample" {
		t.Fatalf("info %+v", info)
	}

	// Selecting a checkpoint that is not loaded loads it into the arena
	// and txt2img runs on it.
	m, err := os.ReadFile(filepath.Join(f.data, "models", samples.ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(f.data, "models", "more"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.data, "models", "more", "second model.safetensors"), m, 0o644); err != nil {
		t.Fatal(err)
	}
	if status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/options", body: `{"sd_model_checkpoint": "more/second model.safetensors"}`}); status != 200 {
		t.Fatalf("select second: %d %s", status, b)
	}
	if _, ok := f.s.Registry.Model("more_second_model"); !ok {
		t.Fatal("the second checkpoint is not in the registry")
	}
	get("/sdapi/v1/options", &opts)
	get("/sdapi/v1/sd-models", &models)
	if opts["sd_model_checkpoint"] != "more/second model.safetensors" || len(models) != 2 {
		t.Fatalf("options %v models %v", opts["sd_model_checkpoint"], models)
	}
	status, body, _ = f.do(t, call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}`})
	mustJSON(t, body, &res)
	mustJSON(t, []byte(res.Info), &info)
	if status != 200 || info.SDModelName != "more_second_model" {
		t.Fatalf("txt2img on the second checkpoint: %d %+v", status, info)
	}
}

// TestCheckpointTitle: GET /sdapi/v1/options names the current checkpoint
// by the title GET /sdapi/v1/sd-models gives it, without walking the
// models directory: a file at the top or in a sub-folder is its relative
// path; a model whose file is gone, or an unknown name, is its registry
// name.
func TestCheckpointTitle(t *testing.T) {
	f := newFixture(t, "", Options{})
	models := filepath.Join(f.data, "models")
	m, err := os.ReadFile(filepath.Join(models, samples.ModelFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"sub/x.safetensors", "gone.safetensors"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(models, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(models, p), m, 0o644); err != nil {
			t.Fatal(err)
		}
		if status, b, _ := f.do(t, call{method: "POST", path: "/v1/models", body: `{"path": "` + p + `"}`}); status != 201 {
			t.Fatalf("load %s: %d %s", p, status, b)
		}
	}
	if err := os.Remove(filepath.Join(models, "gone.safetensors")); err != nil {
		t.Fatal(err)
	}
	var listed []SDModel
	_, b, _ := f.do(t, call{method: "GET", path: "/sdapi/v1/sd-models"})
	mustJSON(t, b, &listed)
	for _, tc := range []struct{ model, want string }{
		{"sample", samples.ModelFile},
		{"x", "sub/x.safetensors"},
		{"gone", "gone"},
		{"not-loaded", "not-loaded"},
	} {
		got := f.api.checkpointTitle(tc.model)
		if got != tc.want {
			t.Errorf("title of %s = %q, want %q", tc.model, got, tc.want)
		}
		if tc.model == "not-loaded" {
			continue
		}
		found := false
		for _, l := range listed {
			found = found || (l.Title == got && l.Loaded == tc.model)
		}
		if !found {
			t.Errorf("title %q of %s is not its sd-models entry: %+v", got, tc.model, listed)
		}
	}
}
