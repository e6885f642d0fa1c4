package main

import (
	"bytes"
	"fmt"
	"image/png"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/sdk/plugintest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// writeDecoder writes a TAESD decoder with random weights under
// madebyollin/taesd's keys for a 16-channel latent (TAEF1's shape).
func writeDecoder(t *testing.T) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	var ts []safetensors.WriteTensor
	add := func(name string, shape ...int64) {
		n := int64(1)
		for _, d := range shape {
			n *= d
		}
		xs := make([]float32, n)
		for i := range xs {
			xs[i] = float32(rng.NormFloat64() * 0.05)
		}
		ts = append(ts, safetensors.WriteTensor{Name: name, DType: safetensors.F32, Shape: shape, Data: f32(xs)})
	}
	add("1.weight", 64, 16, 3, 3)
	add("1.bias", 64)
	for _, b := range []int{3, 4, 5, 8, 9, 10, 13, 14, 15, 18} {
		for _, c := range []int{0, 2, 4} {
			add(fmt.Sprintf("%d.conv.%d.weight", b, c), 64, 64, 3, 3)
			add(fmt.Sprintf("%d.conv.%d.bias", b, c), 64)
		}
	}
	for _, c := range []int{7, 12, 17} {
		add(fmt.Sprintf("%d.weight", c), 64, 64, 3, 3)
	}
	add("19.weight", 3, 64, 3, 3)
	add("19.bias", 3)
	path := filepath.Join(t.TempDir(), "taef1_decoder.safetensors")
	if err := safetensors.WriteFile(path, nil, ts); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestTAESDMethodWithDecoderFile(t *testing.T) {
	path := writeDecoder(t)
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}, Env: []string{EnvDecoder + "=" + path}})
	var names []string
	for _, m := range p.Describe.GetMethods() {
		names = append(names, m.GetName())
	}
	if !slices.Contains(names, "render.taesd") || !slices.Contains(names, "render.factor") {
		t.Fatalf("methods %v: want render.factor and render.taesd with %s set", names, EnvDecoder)
	}
	lat := p.Host.Put(t, "latent", pluginv1.DType_DTYPE_F32, []int64{16, 32, 32}, f32(make([]float32, 16*32*32)), pluginv1.Access_ACCESS_READ_ONLY)
	args, _ := msgpack.Marshal(RenderArgs{Family: "flux", Format: "png"})
	resp, err := p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: "render.taesd", Args: args, Tensors: []*pluginv1.TensorDescriptor{lat}})
	if err != nil {
		t.Fatal(err)
	}
	var res RenderResult
	if err := msgpack.Unmarshal(resp.GetResult(), &res); err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(res.Image))
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bounds(); b.Dx() != 256 || b.Dy() != 256 || res.Method != "taesd" {
		t.Fatalf("taesd frame %v method %q, want 256×256 taesd", b, res.Method)
	}

	// A file that is not a decoder leaves only the factor method.
	bad := filepath.Join(t.TempDir(), "bad.safetensors")
	if err := safetensors.WriteFile(bad, nil, []safetensors.WriteTensor{{Name: "x", DType: safetensors.F32, Shape: []int64{1}, Data: f32([]float32{1})}}); err != nil {
		t.Fatal(err)
	}
	p2 := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}, Env: []string{EnvDecoder + "=" + bad}})
	for _, m := range p2.Describe.GetMethods() {
		if m.GetName() == "render.taesd" {
			t.Fatal("render.taesd listed with a bad decoder file")
		}
	}
}
