package samples

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// BundleFile is the sample Forge/ComfyUI-style bundled single file: the
// sample NF4 model under model.diffusion_model. beside a small CLIP-L in
// F16 and T5 in F8_E4M3 (text_encoders.clip_l./t5xxl., as Forge stores
// them) and one BF16 VAE tensor. Only the encoders' Linear weights are
// written (what text-encoder LoRAs target), not whole encoders.
const BundleFile = "flux-sample-bundle.safetensors"

// BundleTELoRAFile is a kohya text-encoder LoRA on every encoder weight of
// the bundle (lora_te1_… for CLIP-L, lora_te3_… for T5), rank 4, alpha 4.
const BundleTELoRAFile = "flux-sample-bundle-te-lora.safetensors"

// bundleTE lists the bundle's encoder weights: prefix, LoRA module prefix,
// module path, out, in.
func bundleTE() []struct {
	key, module string
	out, in     int
	dtype       safetensors.DType
} {
	type te = struct {
		key, module string
		out, in     int
		dtype       safetensors.DType
	}
	var out []te
	const clipW, clipFF = 32, 64
	for l := range 2 {
		for _, m := range []struct {
			path    string
			out, in int
		}{
			{"self_attn.q_proj", clipW, clipW}, {"self_attn.k_proj", clipW, clipW}, {"self_attn.v_proj", clipW, clipW},
			{"self_attn.out_proj", clipW, clipW}, {"mlp.fc1", clipFF, clipW}, {"mlp.fc2", clipW, clipFF},
		} {
			p := fmt.Sprintf("text_model.encoder.layers.%d.%s", l, m.path)
			out = append(out, te{"text_encoders.clip_l.transformer." + p + ".weight", "lora_te1_" + strings.ReplaceAll(p, ".", "_"), m.out, m.in, safetensors.F16})
		}
	}
	const t5W, t5FF = 24, 48
	for b := range 2 {
		for _, m := range []struct {
			path    string
			out, in int
		}{
			{"layer.0.SelfAttention.q", t5W, t5W}, {"layer.0.SelfAttention.k", t5W, t5W}, {"layer.0.SelfAttention.v", t5W, t5W},
			{"layer.0.SelfAttention.o", t5W, t5W}, {"layer.1.DenseReluDense.wi_0", t5FF, t5W}, {"layer.1.DenseReluDense.wi_1", t5FF, t5W},
			{"layer.1.DenseReluDense.wo", t5W, t5FF},
		} {
			p := fmt.Sprintf("encoder.block.%d.%s", b, m.path)
			out = append(out, te{"text_encoders.t5xxl.transformer." + p + ".weight", "lora_te3_" + strings.ReplaceAll(p, ".", "_"), m.out, m.in, safetensors.DType("F8_E4M3")})
		}
	}
	return out
}

// BundleTEWeights lists the bundle's text-encoder weight keys.
func BundleTEWeights() []string {
	var out []string
	for _, t := range bundleTE() {
		out = append(out, t.key)
	}
	return out
}

// WriteBundle writes BundleFile's layout to path: the sample model
// (ModelOptions{Seed: seed}) prefixed, plus the encoders' weights ~ N(0,
// 0.05²) rounded to their dtype, and a VAE tensor.
func WriteBundle(path string, seed uint64) error {
	tmp, err := os.MkdirTemp("", "bundle")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bare := filepath.Join(tmp, ModelFile)
	if err := WriteModel(bare, ModelOptions{Seed: seed}); err != nil {
		return err
	}
	f, err := safetensors.Open(bare)
	if err != nil {
		return err
	}
	defer f.Close()
	var ts []safetensors.WriteTensor
	for _, ti := range f.Tensors {
		b, err := f.Data(ti.Name)
		if err != nil {
			return err
		}
		ts = append(ts, safetensors.WriteTensor{Name: "model.diffusion_model." + ti.Name, DType: ti.DType, Shape: ti.Shape, Data: b})
	}
	meta := f.Metadata
	rng := rand.New(rand.NewPCG(seed, 0xb0dd1e))
	for _, t := range bundleTE() {
		v := make([]float32, t.out*t.in)
		for i := range v {
			v[i] = float32(0.05 * rng.NormFloat64())
		}
		var b []byte
		if t.dtype == safetensors.F16 {
			b = make([]byte, 2*len(v))
			half.EncodeF16(b, v)
		} else {
			b = make([]byte, len(v))
			half.EncodeF8E4M3(b, v)
		}
		ts = append(ts, safetensors.WriteTensor{Name: t.key, DType: t.dtype, Shape: []int64{int64(t.out), int64(t.in)}, Data: b})
	}
	vae := make([]byte, 2*8*4*9)
	ts = append(ts, safetensors.WriteTensor{Name: "vae.decoder.conv_in.weight", DType: safetensors.BF16, Shape: []int64{8, 4, 3, 3}, Data: vae})
	return safetensors.WriteFile(path, meta, ts)
}

// WriteBundleTELoRA writes BundleTELoRAFile's layout to path: a kohya
// pair (rank 4, alpha 4, F32) for every bundle encoder weight.
func WriteBundleTELoRA(path string, seed uint64) error {
	w := &loraWriter{dtype: safetensors.F32, rng: rand.New(rand.NewPCG(seed, 0x7e))}
	for _, t := range bundleTE() {
		w.pair(t.module+".lora_down.weight", t.module+".lora_up.weight", t.module+".alpha", 4, t.out, t.in, 4)
	}
	return safetensors.WriteFile(path, map[string]string{"ss_network_module": "networks.lora"}, w.ts)
}
