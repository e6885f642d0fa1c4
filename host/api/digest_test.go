package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/server"
	v1 "github.com/arenahost/arenahost/sdk/api"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// fileDigest computes a model digest straight from a safetensors file, the
// way GET /v1/models/{name}/digest documents it, without the registry.
func fileDigest(t *testing.T, path string) (string, map[string]string) {
	t.Helper()
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	per := map[string]string{}
	var names []string
	for _, ti := range f.Tensors {
		b, err := f.TensorData(ti)
		if err != nil {
			t.Fatal(err)
		}
		s := sha256.Sum256(b)
		per[ti.Name] = hex.EncodeToString(s[:])
		names = append(names, ti.Name)
	}
	sort.Strings(names)
	all := sha256.New()
	for _, n := range names {
		all.Write([]byte(n + "\x00" + per[n] + "\n"))
	}
	return hex.EncodeToString(all.Sum(nil)), per
}

func getDigest(t *testing.T, url string) (int, v1.ModelDigest, map[string]any) {
	t.Helper()
	code, body := loraCall(t, "GET", url, nil)
	raw, _ := json.Marshal(body)
	var d v1.ModelDigest
	if code == http.StatusOK {
		if err := json.Unmarshal(raw, &d); err != nil {
			t.Fatal(err)
		}
	}
	return code, d, body
}

// TestModelDigest: the digest of a loaded model equals the digest of its
// file; a fused LoRA changes exactly the fused weights' packed codes and
// absmax; removing it brings back the file's digest.
func TestModelDigest(t *testing.T) {
	s, err := server.New(t.Context(), server.Config{DataDir: t.TempDir(), PluginsDir: loraPlugins(t), Samples: true,
		ArenaCapacity: 1 << 30, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	srv := httptest.NewServer(New(backendOf(s), quiet))
	t.Cleanup(srv.Close)
	base := srv.URL + "/v1/models/" + server.DefaultModelName + "/digest"
	wantAll, wantPer := fileDigest(t, filepath.Join(s.Config().ModelsDir, samples.ModelFile))

	for _, tc := range []struct {
		name, query string
		code        int
		tensors     int // -1: all of the file's
		errCode     string
	}{
		{"whole model", "", http.StatusOK, -1, ""},
		{"detail", "?detail=1", http.StatusOK, -1, ""},
		{"prefix", "?detail=1&prefix=double_blocks.0.img_attn.qkv.", http.StatusOK, 0, ""},
		{"prefix matching nothing", "?prefix=no.such.", http.StatusOK, 0, ""},
		{"bad detail", "?detail=yes", http.StatusBadRequest, 0, "bad_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, d, body := getDigest(t, base+tc.query)
			if code != tc.code {
				t.Fatalf("status %d (%v), want %d", code, body, tc.code)
			}
			if tc.errCode != "" {
				if body["code"] != tc.errCode {
					t.Errorf("code %v, want %s", body["code"], tc.errCode)
				}
				return
			}
			switch {
			case tc.tensors == -1:
				if d.SHA256 != wantAll || d.Tensors != len(wantPer) {
					t.Errorf("digest %s over %d tensors, want %s over %d (from the file)", d.SHA256, d.Tensors, wantAll, len(wantPer))
				}
			case strings.Contains(tc.query, "prefix=double"):
				if d.Tensors == 0 {
					t.Fatal("prefix matched nothing")
				}
			default:
				if d.Tensors != 0 {
					t.Errorf("%d tensors, want none", d.Tensors)
				}
			}
			for n, h := range d.PerTensor {
				if wantPer[n] != h {
					t.Errorf("tensor %s: %s, want %s", n, h, wantPer[n])
				}
			}
			if strings.Contains(tc.query, "detail=1") && len(d.PerTensor) != d.Tensors {
				t.Errorf("detail lists %d tensors of %d", len(d.PerTensor), d.Tensors)
			}
		})
	}
	if code, _, body := getDigest(t, srv.URL+"/v1/models/nope/digest"); code != http.StatusNotFound || body["code"] != "not_found" {
		t.Errorf("unknown model: %d %v", code, body)
	}

	kohya := strings.TrimSuffix(samples.KohyaLoRAFile, ".safetensors")
	code, body := loraCall(t, "POST", srv.URL+"/v1/loras/apply", map[string]any{"loras": []map[string]any{{"name": kohya}}, "mode": "fuse"})
	if code != http.StatusOK {
		t.Fatalf("fuse: %d %v", code, body)
	}
	fused := map[string]bool{}
	for _, w := range body["fused"].([]any) {
		fused[w.(string)] = true
	}
	if len(fused) == 0 {
		t.Fatalf("fuse touched no weight: %v", body)
	}
	_, d, _ := getDigest(t, base+"?detail=1")
	if d.SHA256 == wantAll {
		t.Fatal("digest unchanged by a fused LoRA")
	}
	for n, h := range d.PerTensor {
		w := strings.TrimSuffix(strings.TrimSuffix(n, ".absmax"), ".weight") + ".weight"
		changed := h != wantPer[n]
		// A fused weight's packed codes and absmax change; nothing else may.
		if changed && !(fused[w] && (strings.HasSuffix(n, ".weight") || strings.HasSuffix(n, ".weight.absmax"))) {
			t.Errorf("tensor %s changed by the fuse but is not a fused weight's codes or absmax", n)
		}
	}
	if code, body := loraCall(t, "DELETE", srv.URL+"/v1/loras", nil); code != http.StatusOK {
		t.Fatalf("remove: %d %v", code, body)
	}
	if _, d, _ := getDigest(t, base); d.SHA256 != wantAll {
		t.Errorf("digest after remove %s, want the file's %s", d.SHA256, wantAll)
	}
}
