package api

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestResultImage(t *testing.T) {
	src := image.NewNRGBA(image.Rect(0, 0, 32, 16))
	src.Set(3, 4, color.NRGBA{R: 200, A: 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, src); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		result  any
		ok      bool
		wantErr string
		w, h    int
	}{
		{"no result", nil, false, "", 0, 0},
		{"no images", map[string]any{"latent": "x"}, false, "", 0, 0},
		{"empty images", map[string]any{"images": []any{}}, false, "", 0, 0},
		{"png", map[string]any{"images": []any{buf.Bytes()}}, true, "", 32, 16},
		{"not bytes", map[string]any{"images": []any{"abc"}}, true, `"images"[0]: string`, 0, 0},
		{"not png", map[string]any{"images": []any{[]byte("GIF89a")}}, true, "decode png", 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img, ok, err := resultImage(tc.result)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				if b := img.Bounds(); b.Dx() != tc.w || b.Dy() != tc.h {
					t.Fatalf("image %v, want %dx%d", b, tc.w, tc.h)
				}
				if r, _, _, _ := img.At(3, 4).RGBA(); r>>8 != 200 {
					t.Fatalf("pixel (3,4) red = %d, want 200", r>>8)
				}
			}
		})
	}
}

func TestResultConditioning(t *testing.T) {
	tests := []struct {
		name       string
		result     any
		cond, note string
	}{
		{"no result", nil, "", ""},
		{"not a map", []any{1}, "", ""},
		{"absent", map[string]any{"images": []any{}}, "", ""},
		{"text encoders", map[string]any{"conditioning": "text_encoders", "conditioning_note": ""}, "text_encoders", ""},
		{"stand-in", map[string]any{"conditioning": "stand-in", "conditioning_note": "no text_encoder"}, "stand-in", "no text_encoder"},
		{"not strings", map[string]any{"conditioning": 3, "conditioning_note": []byte("x")}, "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cond, note := resultConditioning(tc.result)
			if cond != tc.cond || note != tc.note {
				t.Fatalf("got (%q, %q), want (%q, %q)", cond, note, tc.cond, tc.note)
			}
		})
	}
}

func TestResultDecoder(t *testing.T) {
	for _, tc := range []struct {
		result    any
		dec, note string
	}{
		{map[string]any{"decoder": "vae", "decoder_note": ""}, "vae", ""},
		{map[string]any{"decoder": "stand-in", "decoder_note": "the single file bundles no VAE"}, "stand-in", "the single file bundles no VAE"},
		{map[string]any{"conditioning": "text_encoders"}, "", ""},
		{map[string]any{"decoder": 1}, "", ""},
	} {
		if d, note := resultPair(tc.result, "decoder"); d != tc.dec || note != tc.note {
			t.Errorf("%v: got (%q, %q), want (%q, %q)", tc.result, d, note, tc.dec, tc.note)
		}
	}
}

func TestPipelineFolder(t *testing.T) {
	root := t.TempDir()
	pipe := filepath.Join(root, "pipe")
	model := filepath.Join(root, "model")
	odd := filepath.Join(root, "odd")
	for _, d := range []string{filepath.Join(pipe, "transformer"), model, filepath.Join(odd, "model_index.json")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(root, "flux.safetensors")
	for path, body := range map[string]string{
		filepath.Join(pipe, "model_index.json"): `{"_class_name": "FluxPipeline"}`,
		filepath.Join(model, "config.json"):     `{}`,
		file:                                    "x",
	} {
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct{ name, source, want string }{
		{"pipeline folder", pipe, pipe},
		{"transformer component", filepath.Join(pipe, "transformer"), ""},
		{"model folder", model, ""},
		{"single file", file, ""},
		{"model_index.json is a directory", odd, ""},
		{"missing", filepath.Join(root, "nope"), ""},
		{"empty", "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := pipelineFolder(tc.source); got != tc.want {
				t.Fatalf("pipelineFolder(%q) = %q, want %q", tc.source, got, tc.want)
			}
		})
	}
}
