package samples

import (
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// Sample LoRA files written next to the sample model.
const (
	// KohyaLoRAFile is a kohya-format Flux LoRA with BFL module names
	// (lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight, …), rank 8
	// with alpha 4.
	KohyaLoRAFile = "flux-sample-kohya-lora.safetensors"
	// PEFTLoRAFile is a diffusers/PEFT-keyed Flux LoRA with diffusers module
	// names (transformer.transformer_blocks.0.attn.to_q.lora_A.weight, …):
	// split q/k/v on the BFL sample model's fused qkv, rank 4 with alpha 4.
	PEFTLoRAFile = "flux-sample-peft-lora.safetensors"
)

// LoRAOptions says how to write a sample LoRA.
type LoRAOptions struct {
	Config layout.FluxConfig // the model it targets; layout.FluxSample() by default
	Rank   int               // 8 (kohya) or 4 (PEFT) when 0
	Alpha  float32           // rank/2 (kohya) or rank (PEFT) when 0
	// Blocks limits the double and single blocks targeted (all when 0).
	Blocks int
	// DType is BF16 (default), F16 or F32.
	DType safetensors.DType
	Seed  uint64
	// Fill, when not 0, replaces every factor value (not alpha): 3e38
	// writes a LoRA that is finite on disk but whose products overflow,
	// which a fused apply must refuse (docs/security.md).
	Fill float32
}

func (o *LoRAOptions) defaults(rank int, alphaHalf bool) {
	if o.Config == (layout.FluxConfig{}) {
		o.Config = layout.FluxSample()
	}
	if o.Rank == 0 {
		o.Rank = rank
	}
	if o.Alpha == 0 {
		o.Alpha = float32(o.Rank)
		if alphaHalf {
			o.Alpha /= 2
		}
	}
	if o.DType == "" {
		o.DType = safetensors.BF16
	}
}

// blockModule reports whether a module path is inside a double or single
// block below limit (all blocks when limit is 0).
func blockModule(name string, limit int) bool {
	for _, pre := range []string{"double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."} {
		if rest, ok := strings.CutPrefix(name, pre); ok {
			i, err := strconv.Atoi(rest[:strings.IndexByte(rest, '.')])
			return err == nil && (limit == 0 || i < limit)
		}
	}
	return false
}

type loraWriter struct {
	dtype safetensors.DType
	rng   *rand.Rand
	fill  float32
	ts    []safetensors.WriteTensor
}

func (w *loraWriter) put(name string, shape []int64, vals []float32) {
	var b []byte
	switch w.dtype {
	case safetensors.F32:
		b = make([]byte, 4*len(vals))
		half.EncodeF32(b, vals)
	case safetensors.F16:
		b = make([]byte, 2*len(vals))
		half.EncodeF16(b, vals)
	default:
		b = make([]byte, 2*len(vals))
		half.EncodeBF16(b, vals)
	}
	w.ts = append(w.ts, safetensors.WriteTensor{Name: name, DType: w.dtype, Shape: shape, Data: b})
}

// pair writes down [rank × in] ~ N(0, 1/in) and up [out × rank] ~ N(0,
// 1/rank)·0.5, a trained LoRA's typical magnitudes, plus alpha.
func (w *loraWriter) pair(down, up, alpha string, rank, out, in int, a float32) {
	d := make([]float32, rank*in)
	for i := range d {
		d[i] = float32(w.rng.NormFloat64() / math.Sqrt(float64(in)))
	}
	u := make([]float32, out*rank)
	for i := range u {
		u[i] = float32(0.5 * w.rng.NormFloat64() / math.Sqrt(float64(rank)))
	}
	if w.fill != 0 {
		for i := range d {
			d[i] = w.fill
		}
		for i := range u {
			u[i] = w.fill
		}
	}
	w.put(down, []int64{int64(rank), int64(in)}, d)
	w.put(up, []int64{int64(out), int64(rank)}, u)
	if alpha != "" {
		w.put(alpha, []int64{}, []float32{a})
	}
}

// WriteKohyaLoRA writes a kohya Flux LoRA on every block Linear of the
// BFL layout (lora_unet_<module underscored>.lora_down/lora_up/alpha), with
// kohya's training metadata.
func WriteKohyaLoRA(path string, o LoRAOptions) error {
	o.defaults(8, true)
	lin, err := o.Config.Linears(layout.FluxBFL)
	if err != nil {
		return fmt.Errorf("write sample LoRA %s: %w", path, err)
	}
	w := &loraWriter{dtype: o.DType, rng: rand.New(rand.NewPCG(o.Seed, 0x10a4)), fill: o.Fill}
	for _, l := range lin {
		if !blockModule(l.Name, o.Blocks) {
			continue
		}
		k := layout.KohyaName("lora_unet_", l.Name)
		w.pair(k+".lora_down.weight", k+".lora_up.weight", k+".alpha", o.Rank, l.Out, l.In, o.Alpha)
	}
	meta := map[string]string{
		"ss_network_module":     "networks.lora_flux",
		"ss_network_dim":        strconv.Itoa(o.Rank),
		"ss_network_alpha":      strconv.FormatFloat(float64(o.Alpha), 'g', -1, 32),
		"ss_base_model_version": "flux1",
		"ss_output_name":        strings.TrimSuffix(filepath.Base(path), ".safetensors"),
		"arenahost.sample":      "kohya-flux",
	}
	if err := safetensors.WriteFile(path, meta, w.ts); err != nil {
		return fmt.Errorf("write sample LoRA %s: %w", filepath.Base(path), err)
	}
	return nil
}

// WritePEFTLoRA writes a diffusers/PEFT-keyed Flux LoRA on the attention
// and MLP Linears of the diffusers layout (transformer.<module>.lora_A /
// lora_B / alpha), split q/k/v and proj_mlp included.
func WritePEFTLoRA(path string, o LoRAOptions) error {
	o.defaults(4, false)
	lin, err := o.Config.Linears(layout.FluxDiffusers)
	if err != nil {
		return fmt.Errorf("write sample LoRA %s: %w", path, err)
	}
	w := &loraWriter{dtype: o.DType, rng: rand.New(rand.NewPCG(o.Seed, 0x9ef7)), fill: o.Fill}
	for _, l := range lin {
		if !blockModule(l.Name, o.Blocks) || strings.Contains(l.Name, ".norm") {
			continue
		}
		k := "transformer." + l.Name
		w.pair(k+".lora_A.weight", k+".lora_B.weight", k+".alpha", o.Rank, l.Out, l.In, o.Alpha)
	}
	meta := map[string]string{"format": "pt", "modelspec.architecture": "Flux.1-dev/lora", "arenahost.sample": "peft-flux"}
	if err := safetensors.WriteFile(path, meta, w.ts); err != nil {
		return fmt.Errorf("write sample LoRA %s: %w", filepath.Base(path), err)
	}
	return nil
}

// WriteLoRAs writes both sample LoRAs for the sample model into dir.
func WriteLoRAs(dir string, seed uint64) error {
	if err := WriteKohyaLoRA(filepath.Join(dir, KohyaLoRAFile), LoRAOptions{Seed: seed}); err != nil {
		return err
	}
	return WritePEFTLoRA(filepath.Join(dir, PEFTLoRAFile), LoRAOptions{Seed: seed + 1})
}

// LoRAModel is the sample model as shared/lora maps LoRAs onto it: its
// Linears under their BFL names, with the layout they are detected as.
func LoRAModel() (*lora.Model, error) {
	lin, err := layout.FluxSample().Linears(layout.FluxBFL)
	if err != nil {
		return nil, fmt.Errorf("sample model's linears: %w", err)
	}
	layers := make([]lora.Layer, 0, len(lin))
	names := make([]string, 0, len(lin))
	for _, l := range lin {
		layers = append(layers, lora.Layer{Name: l.Name, Out: l.Out, In: l.In})
		names = append(names, l.Name+".weight")
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		return nil, fmt.Errorf("sample model's layout: %w", err)
	}
	return lora.NewModel(info, layers)
}
