package lora

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/nf4"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// benchSlice is a Flux-width slice (hidden 3072, MLP 12288) holding one
// double block's image attention and MLP-in layers, NF4 blocksize 64, with
// n rank-16 kohya LoRAs on all three layers.
func benchSlice(b *testing.B, n int) (*Model, []*Mapping, *memStore) {
	b.Helper()
	layers := []Layer{
		{"double_blocks.0.img_attn.qkv", 9216, 3072},
		{"double_blocks.0.img_attn.proj", 3072, 3072},
		{"double_blocks.0.img_mlp.0", 12288, 3072},
	}
	info := layout.Info{Layout: layout.FluxBFL, Naming: layout.NamingBFL}
	m, err := NewModel(info, layers)
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 1))
	var maps []*Mapping
	for i := 0; i < n; i++ {
		var ts []tt
		for _, l := range layers {
			x, _, _ := loraPair(r, layout.KohyaName("lora_unet_", l.Name), "kohya", 16, l.Out, l.In, 16)
			ts = append(ts, x...)
		}
		path := writeBenchLoRA(b, fmt.Sprintf("l%d.safetensors", i), ts)
		f, err := Parse(path)
		if err != nil {
			b.Fatal(err)
		}
		mp, err := m.Map(f)
		if err != nil {
			b.Fatal(err)
		}
		maps = append(maps, mp)
	}
	w := &lazyW{shapes: map[string][2]int{}, got: map[string][]float32{}}
	for _, l := range layers {
		w.shapes[l.Name] = [2]int{l.Out, l.In}
	}
	store := &memStore{bs: 64, m: m, w: w, layers: map[string]*storedLayer{}, orig: map[string][]byte{}}
	for _, l := range layers {
		if _, err := store.Layer(l.Name); err != nil {
			b.Fatal(err)
		}
	}
	w.got = nil // the fp32 base weights are not needed any more
	return m, maps, store
}

func writeBenchLoRA(b *testing.B, name string, ts []tt) string {
	path := b.TempDir() + "/" + name
	var ws []safetensors.WriteTensor
	for _, x := range ts {
		ws = append(ws, safetensors.WriteTensor{Name: x.name, DType: safetensors.F32, Shape: x.shape, Data: f32Bytes(x.data)})
	}
	if err := safetensors.WriteFile(path, nil, ws); err != nil {
		b.Fatal(err)
	}
	return path
}

func BenchmarkBuildSide5(b *testing.B) {
	m, maps, _ := benchSlice(b, 5)
	s := []float64{1, 1, 1, 1, 1}
	b.ResetTimer()
	for b.Loop() {
		if _, err := BuildSide(m, maps, s, nil, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkFuse(b *testing.B) {
	for _, n := range []int{1, 5} {
		b.Run(fmt.Sprintf("loras=%d", n), func(b *testing.B) {
			m, maps, store := benchSlice(b, n)
			s := make([]float64, n)
			for i := range s {
				s[i] = 1
			}
			p, err := BuildSide(m, maps, s, nil, nil)
			if err != nil {
				b.Fatal(err)
			}
			codec := NF4Codec{Type: nf4.QuantNF4, DType: nf4.BFloat16}
			j := NewMemJournal()
			b.ResetTimer()
			for b.Loop() {
				if err := Fuse(context.Background(), p, store, codec, j, FuseOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(p.Report.PeakScratchBytes), "scratch-B")
			b.ReportMetric(p.Report.Retention, "retention")
			if err := Remove(store, j); err != nil {
				b.Fatal(err)
			}
		})
	}
}

func BenchmarkRemove(b *testing.B) {
	m, maps, store := benchSlice(b, 1)
	p, err := BuildSide(m, maps, []float64{1}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	codec := NF4Codec{Type: nf4.QuantNF4, DType: nf4.BFloat16}
	j := NewMemJournal()
	for b.Loop() {
		b.StopTimer()
		if err := Fuse(context.Background(), p, store, codec, j, FuseOptions{}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := Remove(store, j); err != nil {
			b.Fatal(err)
		}
	}
}
