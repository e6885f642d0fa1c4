package lora_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/host/server"
	"github.com/arenahost/arenahost/internal/testenv"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/nf4"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
	"github.com/arenahost/arenahost/shared/tensor"
)

var (
	once    sync.Once
	tmpRoot string
	onceErr error
)

// fixtures builds the plugin into DIR/plugins/lora-nf4 (as `make build`
// lays it out) and writes the sample model and LoRAs once per run.
func fixtures(t *testing.T) (plugins, models, loras string) {
	t.Helper()
	once.Do(func() {
		if tmpRoot, onceErr = os.MkdirTemp("", "host-lora-test"); onceErr != nil {
			return
		}
		pd := filepath.Join(tmpRoot, "plugins", "lora-nf4")
		if onceErr = os.MkdirAll(pd, 0o755); onceErr != nil {
			return
		}
		if onceErr = testenv.CopyFile(testenv.GoBinary(t, "./plugins/lora-nf4"), filepath.Join(pd, "lora-nf4"), 0o755); onceErr != nil {
			return
		}
		man, err := os.ReadFile("../../plugins/lora-nf4/plugin.json")
		if err != nil {
			onceErr = err
			return
		}
		if onceErr = os.WriteFile(filepath.Join(pd, "plugin.json"), man, 0o644); onceErr != nil {
			return
		}
		md, ld := filepath.Join(tmpRoot, "models"), filepath.Join(tmpRoot, "loras")
		_ = os.MkdirAll(md, 0o755)
		_ = os.MkdirAll(ld, 0o755)
		if onceErr = samples.WriteModel(filepath.Join(md, samples.ModelFile), samples.ModelOptions{Seed: 1}); onceErr != nil {
			return
		}
		// The same model with double-quantized absmax (Forge "v1"), kept
		// outside the models directory: tests load it as nestedModel.
		if onceErr = samples.WriteModel(filepath.Join(tmpRoot, nestedFile), samples.ModelOptions{Seed: 1, Nested: true}); onceErr != nil {
			return
		}
		onceErr = samples.WriteLoRAs(ld, 1)
	})
	if onceErr != nil {
		t.Fatal(onceErr)
	}
	return filepath.Join(tmpRoot, "plugins"), filepath.Join(tmpRoot, "models"), filepath.Join(tmpRoot, "loras")
}

// nestedModel is the sample model with nested absmax, which loadNested
// loads from nestedFile.
const (
	nestedModel = "nested"
	nestedFile  = "flux-sample-nf4-nested.safetensors"
)

// loadNested loads the nested-absmax sample model as nestedModel.
func loadNested(t *testing.T, s *server.Server) {
	t.Helper()
	fixtures(t)
	if _, err := s.Registry.Load(t.Context(), nestedModel, filepath.Join(tmpRoot, nestedFile)); err != nil {
		t.Fatal(err)
	}
}

type buildError struct{ s string }

func (e *buildError) Error() string { return "go build lora-nf4: " + e.s }

func TestMain(m *testing.M) {
	testenv.Main(m, func() {
		if tmpRoot != "" {
			os.RemoveAll(tmpRoot)
		}
	})
}

// newHost starts a real host (arena, registry, plugin manager running the
// built lora-nf4 binary) with the sample model loaded, on the CPU arena.
func newHost(t *testing.T) *server.Server { return newHostOn(t, server.BackendCPU) }

// newHostOn is newHost on the given arena backend (server.BackendCPU,
// server.BackendCUDASim, …).
func newHostOn(t *testing.T, backend string) *server.Server { return newHostWith(t, backend, true) }

// newHostWith is newHostOn with or without the sample model loaded.
func newHostWith(t *testing.T, backend string, samples bool) *server.Server {
	t.Helper()
	plugins, models, loras := fixtures(t)
	s, err := server.New(t.Context(), server.Config{DataDir: t.TempDir(), ModelsDir: models, LoRAsDir: loras, PluginsDir: plugins,
		Samples: samples, ArenaCapacity: 1 << 30, ArenaBackend: backend, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// snapshot copies every stored byte of the default model's 4-bit weights.
func snapshot(t *testing.T, s *server.Server) map[string][]byte {
	t.Helper()
	return snapshotOf(t, s, server.DefaultModelName)
}

// snapshotOf copies every stored byte of model's 4-bit weights.
func snapshotOf(t *testing.T, s *server.Server, model string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	m, _ := s.Registry.Model(model)
	for _, w := range m.Weights {
		for _, tn := range []*registry.Tensor{w.Packed, w.Absmax, w.NestedAbsmax, w.NestedQuantMap, w.StateJSON} {
			if tn == nil {
				continue
			}
			err := s.Registry.View(m.Name, tn.Name, func(_ *registry.Tensor, b []byte) error {
				out[tn.Name] = append([]byte(nil), b...)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return out
}

func sameBytes(t *testing.T, what string, want, got map[string][]byte) {
	t.Helper()
	if len(want) != len(got) {
		t.Fatalf("%s: %d tensors, want %d", what, len(got), len(want))
	}
	for k, w := range want {
		if string(got[k]) != string(w) {
			t.Fatalf("%s: tensor %s differs from the original bytes", what, k)
		}
	}
}

// dq dequantizes a weight of the sample model to float64 [out*in].
func dq(t *testing.T, s *server.Server, w string) ([]float64, int, int) {
	return dqOf(t, s, server.DefaultModelName, w)
}

// dqOf is dq for weight w of model.
func dqOf(t *testing.T, s *server.Server, model, w string) ([]float64, int, int) {
	t.Helper()
	qw, err := s.Registry.Weight(model, w)
	if err != nil {
		t.Fatal(err)
	}
	var d nf4.WeightData
	for _, x := range []struct {
		t   *registry.Tensor
		dst *[]byte
	}{{qw.Packed, &d.Packed}, {qw.Absmax, &d.Absmax}, {qw.NestedAbsmax, &d.NestedAbsmax}, {qw.NestedQuantMap, &d.NestedQuantMap}} {
		if x.t == nil {
			continue
		}
		err := s.Registry.View(model, x.t.Name, func(_ *registry.Tensor, b []byte) error {
			*x.dst = append([]byte(nil), b...)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	f := make([]float32, qw.State.Numel())
	if err := nf4.DequantizeWeight(f, qw.State, d); err != nil {
		t.Fatal(err)
	}
	// dq(W) is what bitsandbytes' dequantize_4bit returns: the product
	// rounded to the weight's logical dtype.
	out := make([]float64, len(f))
	for i, v := range f {
		switch qw.State.DType {
		case nf4.BFloat16:
			v = half.BF16ToF32(half.F32ToBF16(v))
		case nf4.Float16:
			v = half.F16ToF32(half.F32ToF16(v))
		}
		out[i] = float64(v)
	}
	return out, int(qw.State.Shape[0]), int(qw.State.Shape[1])
}

// loraFile reads every tensor of a LoRA file as float32 (BF16/F16/F32).
func loraFile(t *testing.T, path string) map[string][]float32 {
	t.Helper()
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]float32{}
	for _, ti := range f.Header.Tensors {
		b, err := f.TensorData(ti)
		if err != nil {
			t.Fatal(err)
		}
		v := make([]float32, ti.NumElements())
		switch ti.DType {
		case safetensors.BF16:
			half.DecodeBF16(v, b)
		case safetensors.F16:
			half.DecodeF16(v, b)
		default:
			half.DecodeF32(v, b)
		}
		out[ti.Name] = v
	}
	return out
}

// part is one module of a LoRA landing at row offset Row of a weight.
type part struct {
	module, down, up string
	row              int
}

// oracleLoRA is one LoRA of a set with the modules that hit the weights
// under test, written out by hand from the Flux tables (independent of
// shared/lora's mapping).
type oracleLoRA struct {
	file     string
	strength float64
	parts    map[string][]part // weight → parts
}

const hidden = 256 // the sample model's width

func kohyaOracle(s float64) oracleLoRA {
	k := func(m string) part {
		return part{module: "lora_unet_" + m, down: ".lora_down.weight", up: ".lora_up.weight"}
	}
	return oracleLoRA{file: samples.KohyaLoRAFile, strength: s, parts: map[string][]part{
		"double_blocks.0.img_attn.qkv.weight": {k("double_blocks_0_img_attn_qkv")},
		"single_blocks.1.linear1.weight":      {k("single_blocks_1_linear1")},
		"single_blocks.0.linear2.weight":      {k("single_blocks_0_linear2")},
	}}
}

func peftOracle(s float64) oracleLoRA {
	p := func(m string, row int) part {
		return part{module: "transformer." + m, down: ".lora_A.weight", up: ".lora_B.weight", row: row}
	}
	return oracleLoRA{file: samples.PEFTLoRAFile, strength: s, parts: map[string][]part{
		"double_blocks.0.img_attn.qkv.weight": {p("transformer_blocks.0.attn.to_q", 0), p("transformer_blocks.0.attn.to_k", hidden), p("transformer_blocks.0.attn.to_v", 2*hidden)},
		"single_blocks.1.linear1.weight": {p("single_transformer_blocks.1.attn.to_q", 0), p("single_transformer_blocks.1.attn.to_k", hidden),
			p("single_transformer_blocks.1.attn.to_v", 2*hidden), p("single_transformer_blocks.1.proj_mlp", 3*hidden)},
		"single_blocks.0.linear2.weight": {p("single_transformer_blocks.0.proj_out", 0)},
	}}
}

var oracleWeights = []string{"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "single_blocks.0.linear2.weight"}

// wRef returns dq(W) + Σ sᵢ·(alphaᵢ/rᵢ)·Bᵢ·Aᵢ in float64.
func wRef(t *testing.T, s *server.Server, loraDir, w string, set []oracleLoRA) ([]float64, []float64, int, int) {
	return wRefOf(t, s, server.DefaultModelName, loraDir, w, set)
}

// wRefOf is wRef for weight w of model.
func wRefOf(t *testing.T, s *server.Server, model, loraDir, w string, set []oracleLoRA) ([]float64, []float64, int, int) {
	t.Helper()
	base, out, in := dqOf(t, s, model, w)
	ref := append([]float64(nil), base...)
	for _, l := range set {
		ts := loraFile(t, filepath.Join(loraDir, l.file))
		for _, p := range l.parts[w] {
			down, up, alpha := ts[p.module+p.down], ts[p.module+p.up], ts[p.module+".alpha"]
			if down == nil || up == nil || alpha == nil {
				t.Fatalf("%s: module %s missing", l.file, p.module)
			}
			r := len(down) / in
			rows := len(up) / r
			sc := l.strength * float64(alpha[0]) / float64(r)
			for i := 0; i < rows; i++ {
				for j := 0; j < in; j++ {
					var acc float64
					for k := 0; k < r; k++ {
						acc += float64(up[i*r+k]) * float64(down[k*in+j])
					}
					ref[(p.row+i)*in+j] += sc * acc
				}
			}
		}
	}
	return ref, base, out, in
}

// descriptorBytes returns a copy of a descriptor's bytes: mapped, as a
// pipeline would, for shared memory; read through the arena for a device
// slab (the test process cannot open its own slabs).
func descriptorBytes(t *testing.T, s *server.Server, d *pluginv1.TensorDescriptor) []byte {
	t.Helper()
	if d.GetRegion().GetCuda() != nil {
		r, err := arena.RegionFromProto(d.GetRegion())
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, r.Length)
		if err := s.Arena.Read(r, 0, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	mp := tensor.NewMapper()
	defer mp.Close()
	b, err := mp.Bytes(d)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), b...)
}

// backends are the arena backends the end-to-end tests run on.
var backends = []string{server.BackendCPU, server.BackendCUDASim}

// boundLayer reads the factors bound to w, as a pipeline would: their
// descriptors (with the binding generation) and copies of their bytes.
func boundLayer(t *testing.T, s *server.Server, w string) (lf *pluginv1.LayerFactors, ab, bb []byte) {
	t.Helper()
	resp, err := s.LookupTensors(t.Context(), &pluginv1.LookupTensorsRequest{Names: []string{w}, IncludeFactors: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetFactors()) != 1 {
		t.Fatalf("lookup %s with factors: %d factor sets, want 1", w, len(resp.GetFactors()))
	}
	lf = resp.GetFactors()[0]
	return lf, bytes.Clone(descriptorBytes(t, s, lf.GetA())), bytes.Clone(descriptorBytes(t, s, lf.GetB()))
}

// boundFactors reads the F32 factors bound to w, as a pipeline would.
func boundFactors(t *testing.T, s *server.Server, w string) (a, b []float32, rank int, gen uint64) {
	t.Helper()
	lf, ab, bb := boundLayer(t, s, w)
	a, _ = tensor.Float32s(ab)
	b, _ = tensor.Float32s(bb)
	return a, b, int(lf.GetA().GetShape()[0]), lf.GetBindingGeneration()
}

// checkSide compares y = x·dq(W)ᵀ + (x·Aᵀ)·Bᵀ with the fp64 oracle for
// random x on every oracle weight.
func checkSide(t *testing.T, s *server.Server, loraDir string, set []oracleLoRA) {
	t.Helper()
	rng := rand.New(rand.NewPCG(7, 7))
	for _, w := range oracleWeights {
		ref, base, out, in := wRef(t, s, loraDir, w, set)
		a, b, rank, _ := boundFactors(t, s, w)
		const nx = 3
		var maxErr, maxY, maxLoRA float64
		for n := 0; n < nx; n++ {
			x := make([]float64, in)
			for j := range x {
				x[j] = float64(float32(rng.NormFloat64()))
			}
			xa := make([]float64, rank)
			for k := 0; k < rank; k++ {
				for j := 0; j < in; j++ {
					xa[k] += x[j] * float64(a[k*in+j])
				}
			}
			for i := 0; i < out; i++ {
				var yb, yr, yl float64
				for j := 0; j < in; j++ {
					yb += x[j] * base[i*in+j]
					yr += x[j] * ref[i*in+j]
				}
				for k := 0; k < rank; k++ {
					yl += xa[k] * float64(b[i*rank+k])
				}
				maxErr = math.Max(maxErr, math.Abs(yb+yl-yr))
				maxY = math.Max(maxY, math.Abs(yr))
				maxLoRA = math.Max(maxLoRA, math.Abs(yr-yb))
			}
		}
		if maxErr > 1e-4*maxY {
			t.Errorf("%s: side output off the fp64 oracle by %.3g (|y| up to %.3g)", w, maxErr, maxY)
		}
		if maxLoRA < 1e-2*maxY {
			t.Errorf("%s: the LoRA changes y by only %.3g of %.3g: the check would not see a wrong mapping", w, maxLoRA, maxY)
		}
	}
}

func contains(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}
