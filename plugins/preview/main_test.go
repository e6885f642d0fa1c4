package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/jpeg"
	"image/png"
	"math"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// bin is the plugin compiled once per test run, as `make build` would.
var bin = plugintest.NewBinary(".", "preview")

func build(t *testing.T) string { return bin.Path(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	plugintest.Clean()
	os.Exit(code)
}

func TestConformance(t *testing.T) {
	plugintest.Run(t, plugintest.Config{Cmd: []string{build(t)}, WantName: "preview", WantKind: "preview"})
}

func TestManifest(t *testing.T) {
	data, err := os.ReadFile("plugin.json")
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Name, Kind, Language, Command string
		ProtocolVersion               int `json:"protocol_version"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("plugin.json: %v", err)
	}
	if m.Name != "preview" || m.Kind != "preview" || m.Language != "go" || m.Command != "./preview" || m.ProtocolVersion != 1 {
		t.Errorf("plugin.json = %+v; must match what main.go registers", m)
	}
}

// f32 encodes values as little-endian float32 bytes.
func f32(xs []float32) []byte {
	b := make([]byte, 4*len(xs))
	for i, x := range xs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func TestDescribeListsOnlyFactorWithoutDecoder(t *testing.T) {
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	d, err := p.Client.Describe(t.Context(), &pluginv1.DescribeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range d.GetMethods() {
		names = append(names, m.GetName())
	}
	if !slices.Contains(names, "render") || !slices.Contains(names, "render.factor") {
		t.Errorf("methods %v: want render and render.factor", names)
	}
	if slices.Contains(names, "render.taesd") {
		t.Errorf("methods %v: render.taesd listed without %s", names, EnvDecoder)
	}
}

func TestRender(t *testing.T) {
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	// A FLUX.1 latent, 16×6×4, every pixel channel 4 = 1: the colour is
	// row 4 of the Flux table plus the bias, mapped from [-1,1].
	c, h, w := 16, 6, 4
	xs := make([]float32, c*h*w)
	for i := range h * w {
		xs[4*h*w+i] = 1
	}
	d := p.Host.Put(t, "latent", pluginv1.DType_DTYPE_F32, []int64{int64(c), int64(h), int64(w)}, f32(xs), pluginv1.Access_ACCESS_READ_ONLY)
	want := [3]float64{0.0859 - 0.0329, 0.0721 - 0.0718, 0.0329 - 0.0851}
	cases := []struct {
		name, method, format string
		maxSide              int
		wantW, wantH         int
	}{
		{"png default size", "render", "png", 0, 32, 48},
		{"png capped", "render.factor", "png", 24, 16, 24},
		{"jpeg", "render", "jpeg", 0, 32, 48},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args, _ := msgpack.Marshal(RenderArgs{Family: "flux", Format: tc.format, MaxSide: tc.maxSide, Quality: 95})
			resp, err := p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: tc.method, Args: args, Tensors: []*pluginv1.TensorDescriptor{d}})
			if err != nil {
				t.Fatal(err)
			}
			var res RenderResult
			if err := msgpack.Unmarshal(resp.GetResult(), &res); err != nil {
				t.Fatal(err)
			}
			if res.Width != tc.wantW || res.Height != tc.wantH || res.Format != tc.format || res.Family != "flux" || res.Method != "factor" {
				t.Fatalf("result %dx%d %s %s %s, want %dx%d %s flux factor", res.Width, res.Height, res.Format, res.Family, res.Method, tc.wantW, tc.wantH, tc.format)
			}
			var img image.Image
			if tc.format == "png" {
				img, err = png.Decode(bytes.NewReader(res.Image))
			} else {
				img, err = jpeg.Decode(bytes.NewReader(res.Image))
			}
			if err != nil {
				t.Fatalf("decode %s: %v", tc.format, err)
			}
			if b := img.Bounds(); b.Dx() != tc.wantW || b.Dy() != tc.wantH {
				t.Fatalf("decoded %v, want %dx%d", b, tc.wantW, tc.wantH)
			}
			r, g, b, _ := img.At(tc.wantW/2, tc.wantH/2).RGBA()
			tol := 1.0
			if tc.format == "jpeg" {
				tol = 4
			}
			for i, v := range []uint32{r, g, b} {
				exp := math.Round((want[i] + 1) / 2 * 255)
				if math.Abs(float64(v>>8)-exp) > tol {
					t.Errorf("channel %d = %d, want %v±%v", i, v>>8, exp, tol)
				}
			}
		})
	}
}

func TestRenderRejectsBadInput(t *testing.T) {
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	lat := p.Host.Put(t, "latent", pluginv1.DType_DTYPE_F32, []int64{16, 2, 2}, make([]byte, 4*64), pluginv1.Access_ACCESS_READ_ONLY)
	u8 := p.Host.Put(t, "bytes", pluginv1.DType_DTYPE_U8, []int64{64}, make([]byte, 64), pluginv1.Access_ACCESS_READ_ONLY)
	cases := []struct {
		name, method string
		args         RenderArgs
		tensor       *pluginv1.TensorDescriptor
		wantCode     codes.Code
		wantIn       string
	}{
		{"ambiguous family", "render", RenderArgs{}, lat, codes.InvalidArgument, "ambiguous"},
		{"unknown family", "render", RenderArgs{Family: "sd9"}, lat, codes.InvalidArgument, "args.family"},
		{"unknown method", "render", RenderArgs{Family: "flux", Method: "vae"}, lat, codes.InvalidArgument, "args.method"},
		{"taesd without decoder", "render", RenderArgs{Family: "flux", Method: "taesd"}, lat, codes.FailedPrecondition, EnvDecoder},
		{"bad format", "render", RenderArgs{Family: "flux", Format: "webp"}, lat, codes.InvalidArgument, "args.format"},
		{"bad quality", "render", RenderArgs{Family: "flux", Quality: 101}, lat, codes.InvalidArgument, "args.quality"},
		{"bad dtype", "render", RenderArgs{Family: "flux"}, u8, codes.InvalidArgument, `"bytes"`},
		{"no tensor", "render.factor", RenderArgs{Family: "flux"}, nil, codes.InvalidArgument, "latent"},
		{"method mismatch", "render.factor", RenderArgs{Family: "flux", Method: "taesd"}, lat, codes.InvalidArgument, "args.method"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args, _ := msgpack.Marshal(tc.args)
			req := &pluginv1.InvokeRequest{Method: tc.method, Args: args}
			if tc.tensor != nil {
				req.Tensors = []*pluginv1.TensorDescriptor{tc.tensor}
			}
			_, err := p.Client.Invoke(t.Context(), req)
			if status.Code(err) != tc.wantCode || !strings.Contains(fmt.Sprint(err), tc.wantIn) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.wantCode, tc.wantIn)
			}
		})
	}
}
