// Package samples owns the sample files arenahost writes so that the demo
// (`make run`), the CLI's `sample` command and the tests have real-layout
// inputs without downloading weights: a small Flux model in BFL layout,
// quantized to bitsandbytes NF4 with the real layer names and the width rules
// of FLUX.1, in the exact on-disk layout bitsandbytes serializes.
package samples

import (
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"strconv"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// ModelFile is the file name the sample model is written under.
const ModelFile = "flux-sample-nf4.safetensors"

// ModelOptions says how to write a sample model.
type ModelOptions struct {
	Config    layout.FluxConfig // layer shapes; layout.FluxSample() by default
	Blocksize int               // NF4 blocksize; 64 (bitsandbytes' default) when 0
	Nested    bool              // double quantization of absmax (Forge "v1" style)
	DType     string            // logical dtype: "bfloat16" (default) or "float16"
	Seed      uint64
	// RandomCodes stores uniformly random 4-bit codes and absmax in
	// [0.005, 0.05) instead of quantizing drawn weights: a checkpoint of a
	// real model's shapes and layout (Flux-dev's 12B parameters) written in
	// seconds, for timing the product path, whose work does not depend on
	// the values. Not nested.
	RandomCodes bool
}

// WriteModel writes a sample NF4 Flux model in BFL layout to path. Linear
// weights are drawn from N(0, 1/in) (the init scale of a trained layer),
// rounded to the logical dtype and quantized with the bitsandbytes rule;
// biases and norm scales are stored unquantized in the logical dtype.
func WriteModel(path string, o ModelOptions) error {
	if o.Config == (layout.FluxConfig{}) {
		o.Config = layout.FluxSample()
	}
	if o.Blocksize == 0 {
		o.Blocksize = 64
	}
	if o.DType == "" {
		o.DType = "bfloat16"
	}
	st := safetensors.BF16
	enc := half.EncodeBF16
	switch o.DType {
	case "bfloat16":
	case "float16":
		st, enc = safetensors.F16, half.EncodeF16
	default:
		return fmt.Errorf("write sample model %s: dtype %q: want bfloat16 or float16", path, o.DType)
	}
	specs, err := layout.Sample(o.Config)
	if err != nil {
		return fmt.Errorf("write sample model %s: %w", path, err)
	}
	rng := rand.New(rand.NewPCG(o.Seed, 0x5eed))
	var tensors []safetensors.WriteTensor
	for _, s := range specs {
		n := int(s.Elements())
		vals := make([]float32, n)
		shape := make([]int64, len(s.Shape))
		for i, d := range s.Shape {
			shape[i] = int64(d)
		}
		switch s.Kind {
		case layout.KindLinear:
			if o.RandomCodes {
				e := randomCodes(rng, shape, n, o.DType, o.Blocksize)
				for _, en := range e.Entries(s.Name) {
					tensors = append(tensors, safetensors.WriteTensor{Name: en.Key, DType: safetensors.DType(en.DType), Shape: en.Shape, Data: en.Data})
				}
				continue
			}
			std := 1 / math.Sqrt(float64(s.Shape[len(s.Shape)-1]))
			for i := range vals {
				vals[i] = roundTo(o.DType, float32(rng.NormFloat64()*std))
			}
			e, err := nf4.Encode(vals, shape, o.DType, o.Blocksize, o.Nested)
			if err != nil {
				return fmt.Errorf("write sample model %s: quantize %s: %w", path, s.Name, err)
			}
			for _, en := range e.Entries(s.Name) {
				tensors = append(tensors, safetensors.WriteTensor{Name: en.Key, DType: safetensors.DType(en.DType), Shape: en.Shape, Data: en.Data})
			}
			continue
		case layout.KindNormScale:
			for i := range vals {
				vals[i] = 1
			}
		default:
			for i := range vals {
				vals[i] = roundTo(o.DType, float32(rng.NormFloat64()*0.01))
			}
		}
		b := make([]byte, 2*n)
		enc(b, vals)
		tensors = append(tensors, safetensors.WriteTensor{Name: s.Name, DType: st, Shape: shape, Data: b})
	}
	meta := map[string]string{
		"format":           "pt",
		"arenahost.sample": "flux-bfl",
		"arenahost.config": fmt.Sprintf("hidden=%d mlp=%d double=%d single=%d", o.Config.Hidden, o.Config.MLP, o.Config.DoubleBlocks, o.Config.SingleBlocks),
		"arenahost.seed":   strconv.FormatUint(o.Seed, 10),
	}
	if err := safetensors.WriteFile(path, meta, tensors); err != nil {
		return fmt.Errorf("write sample model %s: %w", filepath.Base(path), err)
	}
	return nil
}

// randomCodes is an NF4 weight of n elements with random codes and absmax.
func randomCodes(rng *rand.Rand, shape []int64, n int, dtype string, bs int) *nf4.Encoded {
	e := &nf4.Encoded{
		State:    nf4.QuantState{QuantType: nf4.QuantNF4, Blocksize: bs, DType: nf4.DType(dtype), Shape: shape},
		Packed:   make([]byte, nf4.PackedLen(n)),
		Absmax:   make([]float32, nf4.Blocks(n, bs)),
		QuantMap: nf4.QuantNF4.QuantMap(),
	}
	for i := 0; i < len(e.Packed); i += 8 {
		v := rng.Uint64()
		for k := i; k < min(i+8, len(e.Packed)); k++ {
			e.Packed[k] = byte(v)
			v >>= 8
		}
	}
	for i := range e.Absmax {
		e.Absmax[i] = 0.005 + 0.045*rng.Float32()
	}
	return e
}

func roundTo(dtype string, f float32) float32 {
	if dtype == "float16" {
		return half.F16ToF32(half.F32ToF16(f))
	}
	return half.BF16ToF32(half.F32ToBF16(f))
}
