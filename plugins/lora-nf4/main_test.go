package main

import (
	"github.com/arenahost/arenahost/shared/lora/lorawire"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/arenahost/arenahost/sdk/plugintest"
	"github.com/arenahost/arenahost/shared/half"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// bin is the plugin compiled once per test run, as `make build` would.
var bin = plugintest.NewBinary(".", "lora-nf4")

func build(t *testing.T) string { return bin.Path(t) }

func TestMain(m *testing.M) {
	code := m.Run()
	plugintest.Clean()
	os.Exit(code)
}

func TestConformance(t *testing.T) {
	plugintest.Run(t, plugintest.Config{Cmd: []string{build(t)}, WantName: "lora-nf4", WantKind: "lora"})
}

func invoke(t *testing.T, p *plugintest.Plugin, method string, args, out any) error {
	t.Helper()
	raw, err := msgpack.Marshal(args)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.Client.Invoke(t.Context(), &pluginv1.InvokeRequest{Method: method, Args: raw})
	if err != nil {
		return err
	}
	if out != nil {
		if err := msgpack.Unmarshal(resp.GetResult(), out); err != nil {
			t.Fatal(err)
		}
	}
	return nil
}

func TestInspectSampleLoRAs(t *testing.T) {
	dir := t.TempDir()
	paths := []string{filepath.Join(dir, "kohya.safetensors"), filepath.Join(dir, "peft.safetensors")}
	writeLoRA(t, paths[0], "lora_unet_double_blocks_0_img_attn_qkv", ".lora_down.weight", ".lora_up.weight", 8, 768, 256, 4)
	writeLoRA(t, paths[1], "transformer.transformer_blocks.0.attn.to_q", ".lora_A.weight", ".lora_B.weight", 4, 256, 256, 4)
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	var res lorawire.InspectResult
	if err := invoke(t, p, "inspect", lorawire.InspectArgs{Paths: paths}, &res); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		format     string
		rank       int
		alpha      float64
		firstInKey string
	}{{"kohya", 8, 4, "lora_unet_"}, {"diffusers", 4, 4, "transformer."}}
	if len(res.Files) != 2 {
		t.Fatalf("%d files", len(res.Files))
	}
	for i, f := range res.Files {
		if string(f.Format) != want[i].format || len(f.Modules) == 0 || len(f.Types) != 1 || f.Types[0] != "lora" {
			t.Errorf("%s: format %q types %v modules %d", f.Path, f.Format, f.Types, len(f.Modules))
			continue
		}
		m := f.Modules[0]
		if m.Rank != want[i].rank || m.Alpha != want[i].alpha || m.Scale != want[i].alpha/float64(want[i].rank) {
			t.Errorf("%s: module %+v, want rank %d alpha %v", f.Path, m, want[i].rank, want[i].alpha)
		}
	}
}

func TestBadArguments(t *testing.T) {
	p := plugintest.Start(t, plugintest.Config{Cmd: []string{build(t)}})
	trunc := filepath.Join(t.TempDir(), "trunc.safetensors")
	if err := os.WriteFile(trunc, []byte{1, 2, 3}, 0o644); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		method string
		args   any
		code   codes.Code
	}{
		"inspect truncated":        {"inspect", lorawire.InspectArgs{Paths: []string{trunc}}, codes.InvalidArgument},
		"set_strengths, no plan":   {"set_strengths", lorawire.SetStrengthsArgs{Model: "m", Strengths: []float64{1}}, codes.FailedPrecondition},
		"apply with an odd mode":   {"apply", lorawire.ApplyArgs{Mode: "bake"}, codes.InvalidArgument},
		"remove with nothing held": {"remove", lorawire.RemoveArgs{Model: "m"}, codes.OK},
	} {
		err := invoke(t, p, c.method, c.args, nil)
		if status.Code(err) != c.code {
			t.Errorf("%s: %v, want code %v", name, err, c.code)
		}
	}
}

// writeLoRA writes a one-module LoRA file (BF16 factors, scalar alpha).
func writeLoRA(t *testing.T, path, key, down, up string, rank, out, in int, alpha float32) {
	t.Helper()
	bf := func(n int) []byte {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(i%7) * 0.01
		}
		b := make([]byte, 2*n)
		half.EncodeBF16(b, v)
		return b
	}
	al := make([]byte, 2)
	half.EncodeBF16(al, []float32{alpha})
	err := safetensors.WriteFile(path, nil, []safetensors.WriteTensor{
		{Name: key + down, DType: safetensors.BF16, Shape: []int64{int64(rank), int64(in)}, Data: bf(rank * in)},
		{Name: key + up, DType: safetensors.BF16, Shape: []int64{int64(out), int64(rank)}, Data: bf(out * rank)},
		{Name: key + ".alpha", DType: safetensors.BF16, Shape: []int64{}, Data: al},
	})
	if err != nil {
		t.Fatal(err)
	}
}
