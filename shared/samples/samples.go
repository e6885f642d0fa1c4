// Package samples owns the sample files arenahost writes so that the demo
// (`make run`), the CLI's `sample` command and the tests have real-layout
// inputs without downloading weights: a small Flux model in BFL layout,
// quantized to bitsandbytes NF4 with the real layer names and the width rules
// of FLUX.1, in the exact on-disk layout bitsandbytes serializes.
package samples

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"

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
	var random []randomWeight
	for _, s := range specs {
		n := int(s.Elements())
		shape := make([]int64, len(s.Shape))
		for i, d := range s.Shape {
			shape[i] = int64(d)
		}
		if s.Kind == layout.KindLinear && o.RandomCodes {
			// Streamed by writeRandomCodes: only the layout now.
			st := nf4.QuantState{QuantType: nf4.QuantNF4, Blocksize: o.Blocksize, DType: nf4.DType(o.DType), Shape: shape}
			random = append(random, randomWeight{name: s.Name, n: n, state: st})
			continue
		}
		vals := make([]float32, n)
		switch s.Kind {
		case layout.KindLinear:
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
	if o.RandomCodes {
		if err := writeRandomCodes(path, meta, tensors, random, rng); err != nil {
			return fmt.Errorf("write sample model %s: %w", filepath.Base(path), err)
		}
		return nil
	}
	if err := safetensors.WriteFile(path, meta, tensors); err != nil {
		return fmt.Errorf("write sample model %s: %w", filepath.Base(path), err)
	}
	return nil
}

// randomWeight is a 4-bit weight whose codes and absmax writeRandomCodes
// draws as it writes them.
type randomWeight struct {
	name  string
	n     int
	state nf4.QuantState
}

// writeRandomCodes streams a checkpoint whose 4-bit weights have uniformly
// random codes and absmax in [0.005, 0.05): each tensor is drawn into a
// reused buffer when the file's layout reaches it, so a Flux-dev-sized
// file (6.5 GB) never sits in memory. plain holds the other tensors.
func writeRandomCodes(path string, meta map[string]string, plain []safetensors.WriteTensor, weights []randomWeight, rng *rand.Rand) error {
	type source struct {
		data []byte           // fixed bytes (plain tensors, quant maps, quant-state JSON)
		draw func(dst []byte) // random bytes, drawn into dst
	}
	infos := make([]safetensors.TensorInfo, 0, len(plain)+4*len(weights))
	src := make(map[string]source, cap(infos))
	for _, t := range plain {
		infos = append(infos, safetensors.TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape})
		src[t.Name] = source{data: t.Data}
	}
	code := nf4.QuantNF4.QuantMap()
	qmap := make([]byte, 4*len(code))
	half.EncodeF32(qmap, code[:])
	// Codes are drawn in 8 MiB pieces on all cores, each piece from its
	// own generator seeded from rng: the same file for the same seed.
	drawCodes := func(dst []byte) {
		const piece = 8 << 20
		seed := rng.Uint64()
		var wg sync.WaitGroup
		sem := make(chan struct{}, runtime.GOMAXPROCS(0))
		for p := 0; p*piece < len(dst); p++ {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				r := rand.NewPCG(seed, uint64(p))
				d := dst[p*piece : min((p+1)*piece, len(dst))]
				i := 0
				for ; i+8 <= len(d); i += 8 {
					binary.LittleEndian.PutUint64(d[i:], r.Uint64())
				}
				for v := r.Uint64(); i < len(d); i, v = i+1, v>>8 {
					d[i] = byte(v)
				}
			}()
		}
		wg.Wait()
	}
	drawAbsmax := func(dst []byte) {
		for i := 0; i+4 <= len(dst); i += 4 {
			binary.LittleEndian.PutUint32(dst[i:], math.Float32bits(0.005+0.045*rng.Float32()))
		}
	}
	for _, w := range weights {
		nb := nf4.Blocks(w.n, w.state.Blocksize)
		js := w.state.MarshalPython()
		for _, t := range []struct {
			key   string
			dtype safetensors.DType
			shape []int64
			src   source
		}{
			{w.name, safetensors.U8, []int64{int64(nf4.PackedLen(w.n)), 1}, source{draw: drawCodes}},
			{w.name + nf4.SuffixAbsmax, safetensors.F32, []int64{int64(nb)}, source{draw: drawAbsmax}},
			{w.name + nf4.SuffixQuantMap, safetensors.F32, []int64{16}, source{data: qmap}},
			{w.name + nf4.SuffixQuantStateNF4, safetensors.U8, []int64{int64(len(js))}, source{data: js}},
		} {
			infos = append(infos, safetensors.TensorInfo{Name: t.key, DType: t.dtype, Shape: t.shape})
			src[t.key] = t.src
		}
	}
	fw, err := safetensors.Create(path, meta, infos)
	if err != nil {
		return err
	}
	var buf []byte
	for _, t := range fw.Layout() {
		s := src[t.Name]
		data := s.data
		if s.draw != nil {
			n := int(t.End - t.Begin)
			if cap(buf) < n {
				buf = make([]byte, n)
			}
			data = buf[:n]
			s.draw(data)
		}
		if err := fw.WriteTensor(t.Name, data); err != nil {
			fw.Abort()
			return err
		}
	}
	return fw.Commit()
}

func roundTo(dtype string, f float32) float32 {
	if dtype == "float16" {
		return half.F16ToF32(half.F32ToF16(f))
	}
	return half.BF16ToF32(half.F32ToBF16(f))
}
