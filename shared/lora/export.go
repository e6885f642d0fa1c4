package lora

import (
	"github.com/arenahost/arenahost/shared/lora/lorareport"

	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// MetaMergedFrom is the metadata key WriteLoRA records the merged LoRAs and
// their strengths under (a JSON list of {"file", "strength"}).
const MetaMergedFrom = "arenahost.merged_from"

// WriteLoRA writes the plan as one LoRA file whose factors are the exact
// concatenation of all inputs: for each layer NAME (the model's weight key
// minus ".weight"), NAME.lora_A.weight = A_cat [Σr × in] and
// NAME.lora_B.weight = B_cat [out × Σr] with scale and strength folded in
// (so B·A is the weighted sum of the deltas, and the file needs no alpha),
// plus NAME.lora_B.bias for bias deltas. Layers that carry a dense delta
// cannot be written exactly as factors; they are an error naming the layer.
func WriteLoRA(p *Plan, path string) error {
	var ts []safetensors.WriteTensor
	for _, sl := range p.Layers {
		if sl.Dense != nil {
			var keys []string
			for _, d := range sl.dense {
				if d.delta.ok() {
					keys = append(keys, filepath.Base(p.Mappings[d.lora].File.Path)+":"+d.key)
				}
			}
			return fmt.Errorf("write lora %s: layer %s has a dense delta (%s) with no exact low-rank form", filepath.Base(path), sl.Name, strings.Join(keys, ", "))
		}
		if sl.Rank > 0 {
			ts = append(ts,
				safetensors.WriteTensor{Name: sl.Name + ".lora_A.weight", DType: safetensors.F32, Shape: []int64{int64(sl.Rank), int64(sl.In)}, Data: f32Bytes(sl.A)},
				safetensors.WriteTensor{Name: sl.Name + ".lora_B.weight", DType: safetensors.F32, Shape: []int64{int64(sl.Out), int64(sl.Rank)}, Data: f32Bytes(sl.B)})
		}
		if sl.Bias != nil {
			if sl.Rank == 0 {
				return fmt.Errorf("write lora %s: layer %s has a bias delta but no factors to attach it to", filepath.Base(path), sl.Name)
			}
			ts = append(ts, safetensors.WriteTensor{Name: sl.Name + ".lora_B.bias", DType: safetensors.F32, Shape: []int64{int64(sl.Out)}, Data: f32Bytes(sl.Bias)})
		}
	}
	type src struct {
		File     string  `json:"file"`
		Strength float64 `json:"strength"`
	}
	var from []src
	for i, m := range p.Mappings {
		from = append(from, src{File: filepath.Base(m.File.Path), Strength: p.Strengths[i]})
	}
	b, err := json.Marshal(from)
	if err != nil {
		return fmt.Errorf("write lora %s: %w", filepath.Base(path), err)
	}
	if err := safetensors.WriteFile(path, map[string]string{MetaMergedFrom: string(b)}, ts); err != nil {
		return fmt.Errorf("write lora %s: %w", filepath.Base(path), err)
	}
	return nil
}

func f32Bytes(x []float32) []byte {
	b := make([]byte, 4*len(x))
	half.EncodeF32(b, x)
	return b
}

// Summary is what `arenahost inspect LORA` reports about a file without a
// model (lorareport's).
type Summary = lorareport.Summary

// Summarize describes a parsed file.
func Summarize(f *File) Summary {
	s := Summary{File: filepath.Base(f.Path), Format: f.Format, Modules: len(f.Modules),
		BaseModel: f.Meta.BaseModel, Architecture: f.Meta.Architecture, Unknown: f.Unknown}
	types, ranks, alphas, scales, layouts := map[NetType]bool{}, map[int]bool{}, map[float64]bool{}, map[float64]bool{}, map[layout.Layout]bool{}
	for _, m := range f.Modules {
		if !types[m.Type] {
			types[m.Type] = true
			s.Types = append(s.Types, m.Type)
		}
		s.DoRA = s.DoRA || m.DoRA
		if m.Rank > 0 && !ranks[m.Rank] {
			ranks[m.Rank] = true
			s.Ranks = append(s.Ranks, m.Rank)
		}
		if m.HasAlpha && !alphas[m.Alpha] {
			alphas[m.Alpha] = true
			s.Alphas = append(s.Alphas, m.Alpha)
		}
		if !scales[m.Scale] {
			scales[m.Scale] = true
			s.Scales = append(s.Scales, m.Scale)
		}
		comp, path, _ := resolve(m.Key)
		s.Targets = append(s.Targets, comp+":"+path)
		if comp == compDiffusion {
			layouts[guessLayout(path, f.Meta.BaseModel+" "+f.Meta.Architecture)] = true
		}
	}
	sort.Ints(s.Ranks)
	sort.Float64s(s.Alphas)
	sort.Float64s(s.Scales)
	sort.Strings(s.Targets)
	if len(layouts) > 1 {
		delete(layouts, layout.Unknown) // names of no layout do not outvote one that fits
	}
	if len(layouts) == 1 {
		for l := range layouts {
			s.Layout = l
		}
	}
	return s
}

// guessLayout names the layout a module path (dotted or kohya-flattened)
// belongs to; UNet names are SDXL or SD1.5 by the metadata hint.
func guessLayout(path, hint string) layout.Layout {
	flat := layout.KohyaName("", path)
	unet := func() layout.Layout {
		if strings.Contains(strings.ToLower(hint), "xl") {
			return layout.SDXL
		}
		return layout.SD15
	}
	switch {
	case strings.HasPrefix(flat, "double_blocks_"), strings.HasPrefix(flat, "single_blocks_"), strings.HasPrefix(flat, "final_layer_"),
		flat == "img_in", flat == "txt_in", strings.HasPrefix(flat, "time_in_"), strings.HasPrefix(flat, "vector_in_"), strings.HasPrefix(flat, "guidance_in_"):
		return layout.FluxBFL
	case strings.HasPrefix(flat, "transformer_blocks_"), strings.HasPrefix(flat, "single_transformer_blocks_"),
		flat == "x_embedder", flat == "context_embedder", strings.HasPrefix(flat, "time_text_embed_"), flat == "norm_out_linear", flat == "proj_out":
		return layout.FluxDiffusers
	case strings.HasPrefix(flat, "input_blocks_"), strings.HasPrefix(flat, "output_blocks_"), strings.HasPrefix(flat, "middle_block_"), strings.HasPrefix(flat, "label_emb_"):
		return unet()
	case strings.HasPrefix(flat, "down_blocks_"), strings.HasPrefix(flat, "up_blocks_"), strings.HasPrefix(flat, "mid_block_"):
		return unet()
	}
	return layout.Unknown
}
