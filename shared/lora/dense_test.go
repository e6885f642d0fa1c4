package lora

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/arenahost/arenahost/shared/layout"
	"github.com/arenahost/arenahost/shared/safetensors"
)

// denseStore serves plain weights of a model's bundled text encoders.
type denseStore struct {
	dtype string
	data  map[string][]byte
	shape map[string][2]int
}

func (s *denseStore) Layer(name string) (*QLayer, error) {
	d, ok := s.data[name]
	if !ok {
		return nil, fmt.Errorf("no layer %s", name)
	}
	sh := s.shape[name]
	return &QLayer{Name: name, Out: sh[0], In: sh[1], Dense: s.dtype, Data: d, Raw: [][]byte{d}}, nil
}

// teModel is the sample Flux model (BFL keys under model.diffusion_model.)
// plus a plain CLIP-L q_proj and a T5 q weight, as a bundled file has them.
func teModel(t *testing.T, dtype string, r *rand.Rand) (*Model, *denseStore) {
	t.Helper()
	lin, err := layout.FluxSample().Linears(layout.FluxBFL)
	if err != nil {
		t.Fatal(err)
	}
	var layers []Layer
	var names []string
	for _, li := range lin {
		layers = append(layers, Layer{Name: "model.diffusion_model." + li.Name, Out: li.Out, In: li.In})
		names = append(names, "model.diffusion_model."+li.Name+".weight")
	}
	s := &denseStore{dtype: dtype, data: map[string][]byte{}, shape: map[string][2]int{}}
	for _, te := range []Layer{
		{Name: "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", Out: 24, In: 16},
		{Name: "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", Out: 20, In: 12},
	} {
		layers = append(layers, te)
		names = append(names, te.Name+".weight")
		c := denseCodecs[dtype]
		b := make([]byte, te.Out*te.In*c.size)
		c.encode(b, randMat(r, te.Out, te.In))
		s.data[te.Name], s.shape[te.Name] = b, [2]int{te.Out, te.In}
	}
	info, err := layout.DetectInfo(names)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewModel(info, layers)
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

// A fused text-encoder LoRA on plain weights writes round(w + Σ s·B·A)
// in the stored dtype, the delta being DeltaRows' (the side product), and
// remove gives back every byte; a strength that overflows the dtype is
// refused with ErrNonFinite and the weights as they were.
func TestFuseDenseTextEncoders(t *testing.T) {
	for _, dt := range []string{"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"} {
		t.Run(dt, func(t *testing.T) {
			r := rand.New(rand.NewPCG(11, uint64(len(dt))))
			m, s := teModel(t, dt, r)
			clip, _, _ := loraPair(r, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "kohya", 4, 24, 16, 2)
			t5, _, _ := loraPair(r, "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "kohya", 3, 20, 12, 0)
			path := writeLoRA(t, "te.safetensors", nil, safetensors.F32, append(clip, t5...)...)
			f, err := Parse(path)
			if err != nil {
				t.Fatal(err)
			}
			mp, err := m.Map(f)
			if err != nil {
				t.Fatal(err)
			}
			if len(mp.Unmatched) != 0 || len(mp.Targets) != 2 {
				t.Fatalf("targets %d, unmatched %v", len(mp.Targets), mp.Unmatched)
			}
			orig := map[string][]byte{}
			for k, v := range s.data {
				orig[k] = bytes.Clone(v)
			}
			side, err := BuildSide(m, []*Mapping{mp}, []float64{0.8}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			p, err := BuildDeferred(m, []*Mapping{mp}, []float64{0.8}, nil)
			if err != nil {
				t.Fatal(err)
			}
			j := NewMemJournal()
			if err := Fuse(context.Background(), p, s, nil, j, FuseOptions{TileElems: 40}); err != nil {
				t.Fatal(err)
			}
			c := denseCodecs[dt]
			changed := 0
			for _, sl := range side.Layers {
				n := sl.Out * sl.In
				w, delta, want := make([]float32, n), make([]float32, n), make([]float32, n)
				c.decode(w, orig[sl.Name])
				sl.SetDeltaRows(delta, 0, sl.Out)
				for i := range want {
					want[i] = w[i] + delta[i]
				}
				wb := make([]byte, n*c.size)
				c.encode(wb, want)
				if !bytes.Equal(wb, s.data[sl.Name]) {
					t.Errorf("%s: fused bytes differ from round(w + DeltaRows)", sl.Name)
				}
				if !bytes.Equal(wb, orig[sl.Name]) {
					changed++
				}
			}
			if changed != 2 {
				t.Errorf("%d of 2 layers changed", changed)
			}
			if p.Report.Retention <= 0 {
				t.Errorf("retention %v", p.Report.Retention)
			}
			if err := Remove(s, j); err != nil {
				t.Fatal(err)
			}
			for k, v := range orig {
				if !bytes.Equal(v, s.data[k]) {
					t.Errorf("%s: not restored byte for byte", k)
				}
			}
			// A strength that overflows the factors, and one whose merged
			// values overflow the dtype: refused, and Fuse puts back what it
			// wrote, except that E4M3 saturates at ±448 as torch does.
			for _, st := range []float64{1e39, 1e7} {
				p, err = BuildDeferred(m, []*Mapping{mp}, []float64{st}, nil)
				if err != nil {
					t.Fatal(err)
				}
				err = Fuse(context.Background(), p, s, nil, NewMemJournal(), FuseOptions{TileElems: 40})
				switch {
				case st == 1e7 && (dt == "F32" || dt == "BF16"):
					if err != nil {
						t.Fatalf("strength %g: %v", st, err)
					}
				case st == 1e7 && dt == "F8_E4M3":
					if err != nil {
						t.Fatalf("strength %g: %v", st, err)
					}
					if !bytes.Contains(s.data[side.Layers[0].Name], []byte{0x7e}) && !bytes.Contains(s.data[side.Layers[0].Name], []byte{0xfe}) {
						t.Errorf("strength %g on E4M3: no value saturated at ±448", st)
					}
				default:
					if !errors.Is(err, ErrNonFinite) {
						t.Fatalf("strength %g: %v, want ErrNonFinite", st, err)
					}
					for k, v := range orig {
						if !bytes.Equal(v, s.data[k]) {
							t.Errorf("strength %g: %s changed by a refused fuse", st, k)
						}
					}
				}
				for k, v := range orig { // start the next case from the originals
					copy(s.data[k], v)
				}
			}
		})
	}
}
