package plugintest_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/plugintest"
)

// TestPythonExamples runs the suite against every Python example plugin
// (a plugin.json with language "python" under sdk/examples/*/ or
// sdk/python/examples/*/), started as its manifest says with
// ${ARENAHOST_PYTHON} the core interpreter, exec'd directly.
func TestPythonExamples(t *testing.T) {
	py := testenv.Python(t)
	root := testenv.RepoRoot(t)
	var manifests []string
	for _, pat := range []string{"sdk/examples/*/plugin.json", "sdk/python/examples/*/plugin.json"} {
		m, _ := filepath.Glob(filepath.Join(root, pat))
		manifests = append(manifests, m...)
	}
	found := 0
	for _, path := range manifests {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var man struct {
			Name     string   `json:"name"`
			Language string   `json:"language"`
			Command  string   `json:"command"`
			Args     []string `json:"args"`
		}
		if err := json.Unmarshal(data, &man); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if man.Language != "python" {
			continue
		}
		found++
		cmd := os.Expand(man.Command, func(k string) string {
			if k == "ARENAHOST_PYTHON" {
				return py
			}
			return os.Getenv(k)
		})
		t.Run(man.Name, func(t *testing.T) {
			plugintest.Run(t, plugintest.Config{
				Cmd:      append([]string{cmd}, man.Args...),
				Dir:      filepath.Dir(path),
				Language: "python",
				WantName: man.Name,
			})
		})
	}
	if found == 0 {
		t.Fatalf("no Python example plugin found among %d manifests", len(manifests))
	}
}
