package lora_test

import (
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/sdk/api"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/tensor"
)

// The LoRA engine (the real lora-nf4 plugin) on sharded diffusers folders
// written by diffusers + bitsandbytes (host/cli/testdata/flux_family.py):
// Chroma, FLUX.1-Fill, SDXL's UNet and SD3.5, each with its PEFT LoRA.
// Side mode equals the fp64 oracle dq(W) + (alpha/r)·B·A on sampled
// layers, fuse mode's codes equal PEFT's merge() on the bnb model on
// ≥ 99.9 %, and remove restores every byte, from the shards.
func TestFamilyFoldersThroughTheEngine(t *testing.T) {
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	fams := []string{"chroma", "flux-fill", "sdxl", "sd35"}
	cmd := exec.Command(py, filepath.Join("..", "cli", "testdata", "flux_family.py"), "make", dir)
	cmd.Env = append(os.Environ(), "FAMILIES="+strings.Join(fams, ","))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("flux_family.py: %v\n%s", err, out)
	}
	s := newHost(t)
	for _, fam := range fams {
		t.Run(fam, func(t *testing.T) {
			if _, err := s.Registry.Load(t.Context(), fam, filepath.Join(dir, fam, "nf4-sharded")); err != nil {
				t.Fatal(err)
			}
			orig := snapshotOf(t, s, fam)
			lf := filepath.Join(dir, fam, "lora.safetensors")
			req := lora.Request{Model: fam, LoRAs: []api.AppliedLoRA{{Name: "lora", Path: lf, Strength: 1}}, Strict: true, Mode: lora.ModeSide}
			if _, err := s.LoRAs.Apply(t.Context(), req); err != nil {
				t.Fatal(err)
			}
			checkSideOf(t, s, fam, loraFile(t, lf), 2) // lora_alpha 8 / r 4
			if _, err := s.LoRAs.Remove(t.Context(), fam); err != nil {
				t.Fatal(err)
			}
			req.Mode = lora.ModeFuse
			res, err := s.LoRAs.Apply(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			if res.JournalFileBytes == 0 || res.JournalBytes != 0 {
				t.Errorf("journal: %d arena bytes, %d referenced in the shards", res.JournalBytes, res.JournalFileBytes)
			}
			fused := snapshotOf(t, s, fam)
			peft, err := safetensors.Open(filepath.Join(dir, fam, "peft-merged.safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			agree, total := 0, 0
			for _, ti := range peft.Tensors {
				want, _ := peft.Data(ti.Name)
				got := fused[ti.Name]
				if len(got) != len(want) {
					t.Fatalf("%s: %d bytes fused, PEFT %d", ti.Name, len(got), len(want))
				}
				for i := range want {
					agree += b2i(want[i]>>4 == got[i]>>4) + b2i(want[i]&15 == got[i]&15)
					total += 2
				}
			}
			peft.Close()
			t.Logf("%s: fused codes vs PEFT merge on the bnb model: %d/%d (%.5f%%)", fam, agree, total, 100*float64(agree)/float64(total))
			if float64(agree) < 0.999*float64(total) {
				t.Errorf("only %d of %d codes agree with PEFT's merge", agree, total)
			}
			if _, err := s.LoRAs.Remove(t.Context(), fam); err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "remove", orig, snapshotOf(t, s, fam))
		})
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// checkSideOf compares y = x·dq(W)ᵀ + (x·Aᵀ)·Bᵀ, with the factors bound to
// model's weights, against x·(dq(W) + scale·B·A)ᵀ in float64 on three of
// the LoRA's modules (first, middle, last by name).
func checkSideOf(t *testing.T, s *server.Server, model string, lo map[string][]float32, scale float64) {
	t.Helper()
	var mods []string
	for k := range lo {
		if m, ok := strings.CutSuffix(k, ".lora_A.weight"); ok {
			mods = append(mods, m)
		}
	}
	sort.Strings(mods)
	if len(mods) < 3 {
		t.Fatalf("LoRA has %d modules", len(mods))
	}
	rng := rand.New(rand.NewPCG(9, 9))
	for _, mod := range []string{mods[0], mods[len(mods)/2], mods[len(mods)-1]} {
		_, path, _ := strings.Cut(mod, ".") // "transformer." / "unet."
		w := path + ".weight"
		base, out, in := dqOf(t, s, model, w)
		down, up := lo[mod+".lora_A.weight"], lo[mod+".lora_B.weight"]
		r := len(down) / in
		resp, err := s.LookupTensors(t.Context(), &pluginv1.LookupTensorsRequest{Model: model, Names: []string{w}, IncludeFactors: true})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetFactors()) != 1 {
			t.Fatalf("%s: %d factor sets bound", w, len(resp.GetFactors()))
		}
		lf := resp.GetFactors()[0]
		a, _ := tensor.Float32s(descriptorBytes(t, s, lf.GetA()))
		b, _ := tensor.Float32s(descriptorBytes(t, s, lf.GetB()))
		rank := int(lf.GetA().GetShape()[0])
		x := make([]float64, in)
		for j := range x {
			x[j] = float64(float32(rng.NormFloat64()))
		}
		xa, xd := make([]float64, rank), make([]float64, r)
		for k := 0; k < rank; k++ {
			for j := 0; j < in; j++ {
				xa[k] += x[j] * float64(a[k*in+j])
			}
		}
		for k := 0; k < r; k++ {
			for j := 0; j < in; j++ {
				xd[k] += x[j] * float64(down[k*in+j])
			}
		}
		var maxErr, maxY, maxLoRA float64
		for i := 0; i < out; i++ {
			var yb, yl, yo float64
			for j := 0; j < in; j++ {
				yb += x[j] * base[i*in+j]
			}
			for k := 0; k < rank; k++ {
				yl += xa[k] * float64(b[i*rank+k])
			}
			for k := 0; k < r; k++ {
				yo += scale * float64(up[i*r+k]) * xd[k]
			}
			maxErr = math.Max(maxErr, math.Abs(yl-yo))
			maxY = math.Max(maxY, math.Abs(yb+yo))
			maxLoRA = math.Max(maxLoRA, math.Abs(yo))
		}
		t.Logf("%s %s: side output vs fp64 oracle: max |Δy| %.3g (|y| ≤ %.3g, LoRA term ≤ %.3g)", model, w, maxErr, maxY, maxLoRA)
		if maxErr > 1e-4*maxY {
			t.Errorf("%s: side output off the fp64 oracle by %.3g (|y| up to %.3g)", w, maxErr, maxY)
		}
		if maxLoRA < 1e-2*maxY {
			t.Errorf("%s: the LoRA term is only %.3g of %.3g", w, maxLoRA, maxY)
		}
	}
}
