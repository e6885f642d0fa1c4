package client_test

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/client"
	"github.com/arenahost/arenahost/sdk/client/tensors"
)

// The tensors route is served by sdk/client/tensors (protobuf answer).
var _ = tensors.Get

// routeMethods maps every /v1 route docs/api.md documents to the client
// method that calls it.
var routeMethods = map[string]string{
	"GET /v1/health":                  "Health",
	"GET /v1/arena":                   "Arena",
	"GET /v1/arena/usage":             "ArenaUsage",
	"GET /v1/arena/history":           "ArenaHistory",
	"GET /v1/models":                  "Models",
	"GET /v1/models/files":            "ModelFiles",
	"POST /v1/models":                 "LoadModel",
	"DELETE /v1/models/{name}":        "UnloadModel",
	"GET /v1/models/{name}/digest":    "ModelDigest",
	"GET /v1/models/{name}/tensors":   "tensors.Get", // sdk/client/tensors
	"GET /v1/plugins":                 "Plugins",
	"POST /v1/plugins/{name}/reload":  "ReloadPlugin",
	"POST /v1/plugins/rescan":         "RescanPlugins",
	"GET /v1/pipelines":               "Pipelines",
	"GET /v1/plugins/{name}/logs":     "PluginLogs",
	"GET /v1/loras":                   "LoRAs",
	"POST /v1/loras/apply":            "ApplyLoRAs",
	"DELETE /v1/loras":                "RemoveLoRAs",
	"GET /v1/loras/state":             "LoRAState",
	"POST /v1/jobs":                   "CreateJob",
	"GET /v1/jobs":                    "Jobs",
	"GET /v1/jobs/{id}":               "Job",
	"DELETE /v1/jobs/{id}":            "CancelJob",
	"GET /v1/jobs/{id}/preview.jpg":   "Frame",
	"GET /v1/jobs/{id}/preview.mjpeg": "Previews",
	"GET /v1/jobs/{id}/events":        "Events",
}

// TestCoversEveryDocumentedRoute keeps the client complete: a /v1 route
// added to docs/api.md without a client method fails here.
func TestCoversEveryDocumentedRoute(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(testenv.RepoRoot(t), "docs", "api.md"))
	if err != nil {
		t.Fatal(err)
	}
	route := regexp.MustCompile("`([A-Z]+) (/v1/[^`?]*)[^`]*`")
	heading := regexp.MustCompile("(?m)^### .*$")
	ct := reflect.TypeOf(&client.Client{})
	n := 0
	for _, h := range heading.FindAllString(string(doc), -1) {
		for _, m := range route.FindAllStringSubmatch(h, -1) {
			n++
			r := m[1] + " " + m[2]
			name, ok := routeMethods[r]
			if !ok {
				t.Errorf("docs/api.md documents %s; the client has no method for it (add one and list it here)", r)
				continue
			}
			if name == "tensors.Get" {
				continue // a function of sdk/client/tensors, referenced below
			}
			if _, ok := ct.MethodByName(name); !ok {
				t.Errorf("%s: client.Client has no method %s", r, name)
			}
		}
	}
	if n < len(routeMethods) {
		t.Errorf("found %d /v1 routes in docs/api.md, want at least %d: the pattern is stale", n, len(routeMethods))
	}
}
