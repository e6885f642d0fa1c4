package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/arenahost/arenahost/sdk/api"
)

// Fuzz targets for every JSON request decoder of the API (the seed corpus
// is under testdata/fuzz/). Each checks the decoder's contract: anything
// but one JSON object is a 400 StatusError, never a panic, and what decodes
// re-encodes.

// fuzzDecode checks decodeBody's contract for one request type.
func fuzzDecode[T any](t *testing.T, data []byte) {
	var v T
	err := decodeBody(data, &v)
	if err != nil {
		var se *StatusError
		if !errors.As(err, &se) || se.Status != http.StatusBadRequest {
			t.Fatalf("decode %q: %v is not a 400", data, err)
		}
		return
	}
	if s := strings.TrimLeft(string(data), " \t\r\n"); !strings.HasPrefix(s, "{") {
		t.Fatalf("decode %q: accepted a body that is not an object", data)
	}
	if _, err := json.Marshal(v); err != nil {
		t.Fatalf("decode %q: the value does not re-encode: %v", data, err)
	}
}

// fuzzDirs makes a models and a LoRA directory holding what the request
// checks must tell apart (the seed corpus names these files): regular
// files at the top and in a sub-folder, a diffusers model folder, a
// symlink that stays inside, one that leaves (to /etc/passwd), a symlink
// loop, a FIFO and a directory named like a file.
func fuzzDirs(f *testing.F) (models, loras string) {
	root := f.TempDir()
	models, loras = filepath.Join(root, "models"), filepath.Join(root, "loras")
	for _, d := range []string{models, loras} {
		for _, p := range []string{"sub", "dir.safetensors", "folder"} {
			if err := os.MkdirAll(filepath.Join(d, p), 0o755); err != nil {
				f.Fatal(err)
			}
		}
		for _, p := range []string{"a.safetensors", "m.safetensors", "sub/b.safetensors", "folder/config.json", "folder/diffusion_pytorch_model.safetensors"} {
			if err := os.WriteFile(filepath.Join(d, p), []byte("x"), 0o644); err != nil {
				f.Fatal(err)
			}
		}
		for link, target := range map[string]string{"in.safetensors": "sub/b.safetensors", "out.safetensors": "/etc/passwd", "loop.safetensors": "loop.safetensors", "up.safetensors": "../models/m.safetensors"} {
			if err := os.Symlink(target, filepath.Join(d, link)); err != nil {
				f.Fatal(err)
			}
		}
		if err := syscall.Mkfifo(filepath.Join(d, "fifo.safetensors"), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	return models, loras
}

// clientError fails t unless err is a 4xx (a client's mistake).
func clientError(t *testing.T, what string, err error) {
	t.Helper()
	if st, _ := statusOf(err); st < 400 || st >= 500 {
		t.Fatalf("%s: %v answers %d, want a 4xx", what, err, st)
	}
}

// FuzzDecodeLoadModel: POST /v1/models' decoder and every check before the
// registry opens the file: the path resolves inside the models directory
// (a file or a model folder) or is a 4xx, and the name is a safe one.
func FuzzDecodeLoadModel(f *testing.F) {
	models, _ := fuzzDirs(f)
	a := &API{opts: Options{ModelsDir: models}}
	root, err := filepath.EvalSymlinks(models)
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"path": "flux.safetensors", "name": "flux"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzDecode[v1.LoadModelRequest](t, data)
		var req v1.LoadModelRequest
		if decodeBody(data, &req) != nil {
			return
		}
		path, name, err := a.checkLoadModel(req)
		if err != nil {
			clientError(t, fmt.Sprintf("load %q", data), err)
			return
		}
		if !within(root, path) {
			t.Fatalf("load %q: path %s outside %s", data, path, root)
		}
		if checkName(name) != nil {
			t.Fatalf("load %q: name %q accepted", data, name)
		}
	})
}

// FuzzDecodeApply: POST /v1/loras/apply's decoder and every check before
// the coordinator: each LoRA resolves to a regular file inside the LoRA
// directory, with a finite strength within ±100, or the request is a 4xx.
func FuzzDecodeApply(f *testing.F) {
	_, loras := fuzzDirs(f)
	a := &API{opts: Options{LoRAsDir: loras}}
	root, err := filepath.EvalSymlinks(loras)
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"loras": [{"name": "a", "strength": 0.5}], "mode": "fuse"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzDecode[v1.ApplyRequest](t, data)
		var req v1.ApplyRequest
		if decodeBody(data, &req) != nil {
			return
		}
		lr, err := a.checkApply(req)
		if err != nil {
			clientError(t, fmt.Sprintf("apply %q", data), err)
			return
		}
		if len(lr.LoRAs) != len(req.LoRAs) || lr.Mode != req.Mode || lr.Model != req.Model {
			t.Fatalf("apply %q: request %+v from %+v", data, lr, req)
		}
		for _, e := range lr.LoRAs {
			if math.IsNaN(e.Strength) || e.Strength > 100 || e.Strength < -100 {
				t.Fatalf("apply %q: strength %v accepted", data, e.Strength)
			}
			st, err := os.Stat(e.Path)
			if !within(root, e.Path) || err != nil || !st.Mode().IsRegular() {
				t.Fatalf("apply %q: LoRA %q resolved to %s (%v), not a regular file inside %s", data, e.Name, e.Path, err, root)
			}
		}
	})
}

func FuzzDecodeJobSpec(f *testing.F) {
	f.Add([]byte(`{"pipeline": "reference-pipeline", "params": {"steps": 4}, "preview": {"method": "factor", "every_n": 2}}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[v1.JobSpec](t, data) })
}

// FuzzTxt2Img covers the lenient A1111 decoder with its bounds: whatever
// batch_size and n_iter say, an accepted count is within the limit.
func FuzzTxt2Img(f *testing.F) {
	f.Add([]byte(`{"prompt": "a cat <lora:x:0.5>", "batch_size": 2, "n_iter": 3}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var req Txt2ImgRequest
		if json.Unmarshal(data, &req) != nil {
			return
		}
		if n, err := imageCount(req.BatchSize, req.NIter, DefaultMaxImages); err == nil && (n < 1 || n > DefaultMaxImages) {
			t.Fatalf("batch %d × iter %d accepted as %d images", req.BatchSize, req.NIter, n)
		}
		if _, tags, err := ParseLoRATags(req.Prompt); err == nil {
			for _, tag := range tags {
				if tag.Strength == nil {
					t.Fatalf("tag %q without a strength", tag.Name)
				}
			}
		}
	})
}

// FuzzConfine: no request path resolves outside its directory, whatever
// its bytes; failures are client errors.
func FuzzConfine(f *testing.F) {
	root := f.TempDir()
	if err := os.WriteFile(filepath.Join(root, "a.safetensors"), []byte("x"), 0o644); err != nil {
		f.Fatal(err)
	}
	if err := os.Symlink("/etc/passwd", filepath.Join(root, "out.safetensors")); err != nil {
		f.Fatal(err)
	}
	f.Add("a.safetensors")
	f.Fuzz(func(t *testing.T, p string) {
		real, err := confine(root, p)
		if err != nil {
			if st, _ := statusOf(err); st >= 500 {
				t.Fatalf("confine(%q): %v answers %d", p, err, st)
			}
			return
		}
		if !within(root, real) {
			t.Fatalf("confine(%q) = %s, outside %s", p, real, root)
		}
	})
}

// FuzzDecodeOptions covers POST /sdapi/v1/options (main's A1111 routes):
// anything but one JSON object is a 400, and what decodes is a map.
func FuzzDecodeOptions(f *testing.F) {
	f.Add([]byte(`{"sd_model_checkpoint": "flux.safetensors", "arenahost_strict": true, "CLIP_stop_at_last_layers": 2}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`[{"sd_model_checkpoint": "x"}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		body, err := decodeOptions(data)
		if err != nil {
			var se *StatusError
			if !errors.As(err, &se) || se.Status != http.StatusBadRequest {
				t.Fatalf("decode %q: %v is not a 400", data, err)
			}
			return
		}
		if s := strings.TrimLeft(string(data), " \t\r\n"); !strings.HasPrefix(s, "{") || body == nil {
			t.Fatalf("decode %q: accepted a body that is not an object", data)
		}
	})
}
