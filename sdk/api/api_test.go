package api_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/lora/lorareport"
	"github.com/arenahost/arenahost/shared/manifest"
)

// TestKindsAreTheManifests: the plugin kinds here are shared/manifest's.
func TestKindsAreTheManifests(t *testing.T) {
	for _, k := range [][2]string{{api.KindLoRA, manifest.KindLoRA}, {api.KindPipeline, manifest.KindPipeline}, {api.KindPreview, manifest.KindPreview}} {
		if k[0] != k[1] {
			t.Errorf("kind %q here, %q in shared/manifest", k[0], k[1])
		}
	}
}

// TestJSONShapes pins the field names of the bodies clients decode most,
// with every field set: embedded structs flatten, durations are
// nanoseconds, zero times are left out.
func TestJSONShapes(t *testing.T) {
	s := 0.5
	at := time.Date(2026, 12, 7, 20, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		v    any
		want string
	}{
		{api.Error{Error: "Not Found", Code: "not_found", Detail: "no model x"}, `{"error":"Not Found","code":"not_found","detail":"no model x"}`},
		{api.ApplyRequest{Model: "m", LoRAs: []api.ApplyLoRA{{Name: "a", Strength: &s}}, Mode: api.ModeFuse, Strict: true},
			`{"model":"m","loras":[{"name":"a","strength":0.5}],"mode":"fuse","strict":true}`},
		{api.LoRAResult{LoRAState: api.LoRAState{Model: "m", LoRAs: []api.AppliedLoRA{{Name: "a", Path: "/l/a.safetensors", Strength: 1}}}, Path: "apply", Elapsed: time.Millisecond},
			`{"model":"m","loras":[{"name":"a","path":"/l/a.safetensors","strength":1}],"noop":false,"path":"apply","elapsed_ns":1000000}`},
		{api.JobCreated{Job: api.Job{ID: "j", Pipeline: "p", Method: "run", State: api.JobQueued, Created: at}, Links: map[string]string{"self": "/v1/jobs/j"}},
			`{"id":"j","pipeline":"p","method":"run","state":"queued","step":0,"total":0,"progress":0,"eta_seconds":0,"elapsed_seconds":0,` +
				`"created":"2026-12-07T20:00:00Z","preview":{"published":0,"rendered":0,"dropped":0,"frame":0,"frame_step":0,"generation":0},"links":{"self":"/v1/jobs/j"}}`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil || string(b) != tc.want {
			t.Errorf("%T:\n got %s (%v)\nwant %s", tc.v, b, err, tc.want)
		}
	}
}

// TestDocsNameEveryField: each JSON field of the /v1 bodies appears in
// docs/api.md, so a field added here is documented there.
func TestDocsNameEveryField(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "api.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []any{api.ModelInfo{}, api.ApplyRequest{}, api.JobSpec{}, api.PreviewSpec{}, api.JobEvent{}, api.RescanResult{}, api.Pipelines{}, api.PipelineInfo{},
		api.LoRAFile{}, lorareport.Summary{}, api.LoRAState{}, api.LoRAResult{}, api.PluginStatus{}, api.Job{}, api.ArenaUsage{}} {
		for _, f := range jsonFields(reflect.TypeOf(v)) {
			if !strings.Contains(string(doc), `"`+f+`"`) && !strings.Contains(string(doc), "`"+f+"`") {
				t.Errorf("%T field %q is not in docs/api.md", v, f)
			}
		}
	}
}

// jsonFields lists the JSON names of t's fields, embedded structs'
// included.
func jsonFields(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if f.Anonymous && name == "" {
			out = append(out, jsonFields(f.Type)...)
			continue
		}
		if name != "-" && name != "" {
			out = append(out, name)
		}
	}
	return out
}
