package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
	v1 "github.com/arenahost/arenahost/sdk/api"
)

func TestParseLoRATags(t *testing.T) {
	tests := []struct {
		in, prompt string
		want       map[string]float64
		err        string
	}{
		{"a cat", "a cat", map[string]float64{}, ""},
		{"a cat <lora:ink:0.6>, watercolor", "a cat , watercolor", map[string]float64{"ink": 0.6}, ""},
		{"<lora:styles/ink> x <lora:b:-1.5:0.3>", "x", map[string]float64{"styles/ink": 1, "b": -1.5}, ""},
		{"<lora:a:0.2> <lora:a:0.9>", "", map[string]float64{"a": 0.9}, ""},
		{"<lora:a:lots>", "", nil, `weight "lots" is not a number`},
	}
	for _, tt := range tests {
		prompt, ls, err := ParseLoRATags(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseLoRATags(%q): err %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		got := map[string]float64{}
		for _, l := range ls {
			got[l.Name] = *l.Strength
		}
		if err != nil || prompt != tt.prompt || fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("ParseLoRATags(%q) = %q, %v, %v; want %q, %v", tt.in, prompt, got, err, tt.prompt, tt.want)
		}
	}
}

func TestResize(t *testing.T) {
	src := image.NewNRGBA(image.Rect(0, 0, 2, 1))
	src.SetNRGBA(0, 0, color.NRGBA{0, 0, 0, 255})
	src.SetNRGBA(1, 0, color.NRGBA{200, 100, 50, 255})
	dst := resize(src, 4, 2)
	if b := dst.Bounds(); b.Dx() != 4 || b.Dy() != 2 {
		t.Fatalf("bounds %v", b)
	}
	// Sample centres: x=0 → -0.25 (clamped to the first pixel), x=1 → 0.25,
	// x=2 → 0.75, x=3 → 1.25 (clamped to the last).
	want := []uint8{0, 50, 150, 200}
	for x, w := range want {
		c := color.NRGBAModel.Convert(dst.At(x, 1)).(color.NRGBA)
		if c.R != w || c.A != 255 {
			t.Errorf("pixel %d: %v, want R=%d", x, c, w)
		}
	}
	if resize(src, 2, 1) != image.Image(src) {
		t.Error("same size: not returned as is")
	}
}

// txt2imgPlugins installs lora-nf4, the preview plugin and host/job's test
// pipeline (built once per test binary) into a fresh plugins directory.
func txt2imgPlugins(t *testing.T) string {
	t.Helper()
	plugins := t.TempDir()
	for _, p := range [][3]string{{"lora-nf4", "./plugins/lora-nf4", "lora"}, {"preview", "./plugins/preview", "preview"}, {"test-pipeline", "./host/job/testdata/pipeline", "pipeline"}} {
		testenv.InstallPlugin(t, plugins, p[0], p[1], goManifest(p[0], p[2]))
	}
	return plugins
}

func TestTxt2Img(t *testing.T) {
	f := newFixture(t, txt2imgPlugins(t), Options{})
	type state struct {
		Mode  string `json:"mode"`
		LoRAs []struct {
			Name     string  `json:"name"`
			Strength float64 `json:"strength"`
		} `json:"loras"`
	}
	tests := []struct {
		name      string
		body      string
		w, h, n   int
		wantLoRAs string
	}{
		{"with a LoRA tag", `{"prompt": "a cat <lora:flux-sample-kohya-lora:0.5>", "steps": 4, "seed": 7, "width": 96, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}`, 96, 64, 1, "flux-sample-kohya-lora=0.5"},
		{"batch without tags removes the LoRA", `{"prompt": "a cat", "steps": 3, "seed": -1, "width": 64, "height": 64, "batch_size": 2}`, 64, 64, 2, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := call{method: "POST", path: "/sdapi/v1/txt2img", body: tt.body}
			status, b, _ := f.do(t, c)
			if status != 200 {
				t.Fatalf("status %d: %s", status, b)
			}
			var res Txt2ImgResponse
			mustJSON(t, b, &res)
			if len(res.Images) != tt.n {
				t.Fatalf("%d images, want %d", len(res.Images), tt.n)
			}
			for i, s := range res.Images {
				raw, err := base64.StdEncoding.DecodeString(s)
				if err != nil {
					t.Fatal(err)
				}
				img, err := png.Decode(bytes.NewReader(raw))
				if err != nil {
					t.Fatalf("image %d: %v", i, err)
				}
				if bb := img.Bounds(); bb.Dx() != tt.w || bb.Dy() != tt.h {
					t.Fatalf("image %d is %v, want %dx%d", i, bb, tt.w, tt.h)
				}
			}
			var info Txt2ImgInfo
			if err := json.Unmarshal([]byte(res.Info), &info); err != nil {
				t.Fatalf("info %q: %v", res.Info, err)
			}
			if info.Pipeline != "test-pipeline" || len(info.Jobs) != tt.n || len(info.AllSeeds) != tt.n || info.Seed < 0 || strings.Contains(info.Prompt, "<lora") {
				t.Fatalf("info %+v", info)
			}
			for _, id := range info.Jobs {
				j, err := f.s.Jobs.Get(id)
				if err != nil || j.Snapshot().Origin != v1.OriginA1111 {
					t.Fatalf("job %s of txt2img: %v, want origin %q in the job list", id, err, v1.OriginA1111)
				}
			}
			var st state
			_, b, _ = f.do(t, call{method: "GET", path: "/v1/loras/state"})
			mustJSON(t, b, &st)
			var got []string
			for _, l := range st.LoRAs {
				got = append(got, fmt.Sprintf("%s=%g", l.Name, l.Strength))
			}
			if strings.Join(got, ",") != tt.wantLoRAs || (tt.wantLoRAs != "" && st.Mode != "side") {
				t.Fatalf("LoRA state %+v, want %q in side mode", st, tt.wantLoRAs)
			}
		})
	}
	// What A1111 warns about and carries on with: info.warnings says so.
	for _, tt := range []struct {
		name, body, warning string
		w, h                int
	}{
		{"unknown LoRA", `{"prompt": "<lora:nope:1>", "steps": 2, "width": 64, "height": 64}`, `<lora:nope> skipped: LoRA "nope"`, 64, 64},
		{"escaping LoRA", `{"prompt": "<lora:../models/flux-sample-nf4:1>", "steps": 2, "width": 64, "height": 64}`, "<lora:../models/flux-sample-nf4> skipped", 64, 64},
		{"size rounded", `{"prompt": "x", "steps": 2, "width": 100, "height": 57}`, "size 100×57 rounded to 96×64", 96, 64},
		{"sampler ignored", `{"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "DPM++ 2M"}`, `sampler_name "DPM++ 2M" ignored`, 64, 64},
		{"hires ignored", `{"prompt": "x", "steps": 2, "width": 64, "height": 64, "enable_hr": true}`, "enable_hr=true ignored", 64, 64},
		{"override ignored", `{"prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": {"CLIP_stop_at_last_layers": 2}}`, "override_settings.CLIP_stop_at_last_layers ignored", 64, 64},
	} {
		t.Run(tt.name, func(t *testing.T) {
			status, b, _ := f.do(t, call{method: "POST", path: "/sdapi/v1/txt2img", body: tt.body})
			if status != 200 {
				t.Fatalf("status %d: %s", status, b)
			}
			var res Txt2ImgResponse
			mustJSON(t, b, &res)
			var info Txt2ImgInfo
			mustJSON(t, []byte(res.Info), &info)
			if !strings.Contains(strings.Join(info.Warnings, "\n"), tt.warning) || info.Width != tt.w || info.Height != tt.h || len(res.Images) != 1 {
				t.Fatalf("info %+v, want warning %q and %dx%d", info, tt.warning, tt.w, tt.h)
			}
			// Strict mode refuses the same request.
			var body map[string]any
			mustJSON(t, []byte(tt.body), &body)
			body["override_settings"] = map[string]any{OptionStrict: true}
			if tt.name == "override ignored" {
				body["override_settings"] = map[string]any{OptionStrict: true, "CLIP_stop_at_last_layers": 2}
			}
			sb, _ := json.Marshal(body)
			c := call{method: "POST", path: "/sdapi/v1/txt2img", body: string(sb)}
			status, b, _ = f.do(t, c)
			if status != 400 {
				t.Fatalf("strict: status %d: %s", status, b)
			}
			wantError(t, c, status, b, "strict", tt.warning)
		})
	}
	for _, tt := range []struct {
		name, body, code, detail string
		status                   int
	}{
		{"bad weight", `{"prompt": "<lora:x:y>"}`, "bad_request", "not a number", 400},
		{"bad size", `{"prompt": "x", "width": -100}`, "bad_request", "width×height", 400},
		{"too many", `{"prompt": "x", "batch_size": 4, "n_iter": 3}`, "bad_request", "at most 8", 400},
		{"bad steps", `{"prompt": "x", "steps": 5000}`, "bad_request", "1..1000", 400},
		{"not json", `{"prompt": `, "bad_request", "read request body", 400},
		{"not an object", `[1]`, "bad_request", "read request body", 400},
		{"bad strict", `{"prompt": "x", "override_settings": {"arenahost_strict": "yes"}}`, "bad_request", "not a boolean", 400},
		{"unknown checkpoint", `{"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}`, "not_found", `no checkpoint "nope"`, 404},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := call{method: "POST", path: "/sdapi/v1/txt2img", body: tt.body}
			status, b, _ := f.do(t, c)
			if status != tt.status {
				t.Fatalf("status %d, want %d: %s", status, tt.status, b)
			}
			wantError(t, c, status, b, tt.code, tt.detail)
		})
	}
}

func TestTxt2ImgWithoutPipeline(t *testing.T) {
	f := newFixture(t, "", Options{})
	c := call{method: "POST", path: "/sdapi/v1/txt2img", body: `{"prompt": "a cat"}`}
	status, b, _ := f.do(t, c)
	if status != 503 {
		t.Fatalf("status %d: %s", status, b)
	}
	wantError(t, c, status, b, "unavailable", "no pipeline plugin is installed")
}
