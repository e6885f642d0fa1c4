package api

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/arenahost/arenahost/shared/samples"
)

// TestModelFolderConfined: POST /v1/models with a model folder inside the
// models folder whose weights file, or config.json, is a symlink to a file
// outside it is 400 bad_path naming the file, and nothing is loaded (the
// registry and the arena's allocation are unchanged); the same folder
// whose weights are a symlink that stays inside loads.
func TestModelFolderConfined(t *testing.T) {
	f := newFixture(t, "", Options{})
	models, outside := filepath.Join(f.data, "models"), t.TempDir()
	sample := filepath.Join(models, samples.ModelFile)
	b, err := os.ReadFile(sample)
	if err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(outside, "secret.safetensors")
	if err := os.WriteFile(secret, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "config.json"), []byte(`{}`), 0o644); err != nil {
		t.Fatal(err)
	}
	mk := func(dir string, links map[string]string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(models, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		for name, target := range links {
			if err := os.Symlink(target, filepath.Join(models, dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	const weights = "diffusion_pytorch_model.safetensors"
	mk("shard-out", map[string]string{weights: secret})
	mk("config-out", map[string]string{weights: filepath.Join("..", samples.ModelFile), "config.json": filepath.Join(outside, "config.json")})
	mk("inside", map[string]string{weights: filepath.Join("..", samples.ModelFile)})

	before := f.s.Registry.Models()
	allocated := f.s.Arena.Stats().Allocated
	load := func(p string) call {
		b, _ := json.Marshal(map[string]string{"path": p, "name": "x"})
		return call{method: "POST", path: "/v1/models", body: string(b)}
	}
	f.run(t, []abuseCase{
		{"weights symlinked out", load("shard-out"), 400, "bad_path", "shard-out/" + weights + " resolves to"},
		{"config.json symlinked out", load("config-out"), 400, "bad_path", "config-out/config.json resolves to"},
	}, 10*time.Second)
	if got := f.s.Registry.Models(); len(got) != len(before) {
		t.Fatalf("a refused folder was loaded: %d models, had %d", len(got), len(before))
	}
	if got := f.s.Arena.Stats().Allocated; got != allocated {
		t.Fatalf("arena allocation %d after refused loads, was %d", got, allocated)
	}
	f.run(t, []abuseCase{{"weights symlinked inside", load("inside"), 201, "", ""}}, 30*time.Second)
}

// TestModelDirTreeConfined: a job's model_dir or tokenizer_dir inside the
// models folder that holds a file or a folder symlinked out of it (which
// the pipeline's from_pretrained would follow) is 400 bad_path naming the
// link; a folder whose links stay inside runs.
func TestModelDirTreeConfined(t *testing.T) {
	f := abuseFixture(t, Options{})
	models, outside := filepath.Join(f.data, "models"), t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "vocab.json"), []byte(`{}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"file-out/tokenizer", "dir-out", "inside/tokenizer", "blobs"} {
		if err := os.MkdirAll(filepath.Join(models, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(models, "blobs", "vocab"), []byte(`{}`), 0o644); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"file-out/tokenizer/vocab.json": filepath.Join(outside, "vocab.json"),
		"dir-out/tokenizer":             outside,
		"inside/tokenizer/vocab.json":   "../../blobs/vocab",
	} {
		if err := os.Symlink(target, filepath.Join(models, link)); err != nil {
			t.Fatal(err)
		}
	}
	job := func(key, dir string) call {
		return call{method: "POST", path: "/v1/jobs", body: `{"pipeline": "test-pipeline", "params": {"steps": 2, "step_ms": 1, "` + key + `": "` + dir + `"}, "preview": {"method": "none"}}`}
	}
	f.run(t, []abuseCase{
		{"model_dir file symlinked out", job("model_dir", "file-out"), 400, "bad_path", "file-out/tokenizer/vocab.json resolves to"},
		{"model_dir folder symlinked out", job("model_dir", "dir-out"), 400, "bad_path", "dir-out/tokenizer resolves to"},
		{"tokenizer_dir file symlinked out", job("tokenizer_dir", "file-out/tokenizer"), 400, "bad_path", "vocab.json resolves to"},
		{"model_dir with links inside", job("model_dir", "inside"), 201, "", ""},
	}, 10*time.Second)
}
