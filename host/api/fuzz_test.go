package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
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

func FuzzDecodeLoadModel(f *testing.F) {
	f.Add([]byte(`{"path": "flux.safetensors", "name": "flux"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzDecode[v1.LoadModelRequest](t, data)
		var req v1.LoadModelRequest
		if decodeBody(data, &req) == nil && req.Name != "" {
			_ = checkName(req.Name)
		}
	})
}

func FuzzDecodeApply(f *testing.F) {
	f.Add([]byte(`{"loras": [{"name": "a", "strength": 0.5}], "mode": "fuse"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzDecode[v1.ApplyRequest](t, data)
		var req v1.ApplyRequest
		if decodeBody(data, &req) != nil {
			return
		}
		for _, l := range req.LoRAs {
			if l.Strength != nil && checkStrength(*l.Strength) == nil && (*l.Strength > 100 || *l.Strength < -100) {
				t.Fatalf("strength %v accepted", *l.Strength)
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
