package main

import (
	"encoding/binary"
	"math"
	"os"
	"testing"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/arenahost/arenahost/sdk/plugintest"
	"github.com/arenahost/arenahost/shared/manifest"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
)

// bin is the plugin compiled once per test run, as `make build` would.
var bin = plugintest.NewBinary(".", "go-hello")

func build(t *testing.T) string { return bin.Path(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	plugintest.Clean()
	os.Exit(code)
}

func TestConformance(t *testing.T) {
	plugintest.Run(t, plugintest.Config{Cmd: []string{build(t)}, WantName: "go-hello", WantKind: "other"})
}

func TestScale(t *testing.T) {
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	xs := []float32{1, -2, 3.5, 0}
	in := make([]byte, 4*len(xs))
	for i, x := range xs {
		binary.LittleEndian.PutUint32(in[4*i:], math.Float32bits(x))
	}
	d := p.Host.Put(t, "x", pluginv1.DType_DTYPE_F32, []int64{2, 2}, in, pluginv1.Access_ACCESS_READ_ONLY)
	args, _ := msgpack.Marshal(ScaleArgs{Factor: 2})
	resp, err := p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: "scale", Args: args, Tensors: []*pluginv1.TensorDescriptor{d}})
	if err != nil {
		t.Fatalf("invoke scale: %v", err)
	}
	var res ScaleResult
	if err := msgpack.Unmarshal(resp.GetResult(), &res); err != nil {
		t.Fatalf("decode result: %v", err)
	}
	if res.Count != 4 || res.Sum != 5 {
		t.Errorf("result %+v, want count 4 sum 5", res)
	}
	if len(resp.GetTensors()) != 1 || resp.GetTensors()[0].GetName() != "go-hello.scaled" {
		t.Fatalf("returned tensors %v, want one go-hello.scaled", resp.GetTensors())
	}
	out, err := p.Host.Bytes(resp.GetTensors()[0])
	if err != nil {
		t.Fatal(err)
	}
	for i, x := range xs {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(out[4*i:])); got != 2*x {
			t.Errorf("host sees y[%d] = %v, want %v", i, got, 2*x)
		}
	}
	// Without the input tensor the call is refused, naming it.
	_, err = p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: "scale", Args: args})
	if err == nil {
		t.Fatal("scale without input x succeeded")
	}
}

// TestManifest checks plugin.json with the parser the host uses (every
// field valid) and against what main.go registers.
func TestManifest(t *testing.T) {
	m, err := manifest.Parse(manifest.File)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "go-hello" || m.Kind != "other" || m.Language != manifest.LanguageGo || m.Command != "./go-hello" {
		t.Errorf("plugin.json = %+v; must match what main.go registers", m)
	}
}
