package layout

import (
	"strings"
	"testing"
)

// fill is FLUX.1-Fill-dev: 384 input channels (latents, masked latents and
// the packed mask), 64 output channels.
func fill() FluxConfig {
	c := FluxDev()
	c.InChannels, c.OutCh = 384, 64
	return c
}

// lite is Flux.1 Lite 8B's shape: FLUX.1-dev with 8 double blocks.
func lite() FluxConfig {
	c := FluxDev()
	c.DoubleBlocks = 8
	return c
}

func shapesOf(t *testing.T, c FluxConfig, l Layout) map[string][]int {
	t.Helper()
	ts, err := c.Tensors(l)
	if err != nil {
		t.Fatal(err)
	}
	shapes := map[string][]int{}
	for _, s := range ts {
		shapes[s.Name] = s.Shape
	}
	return shapes
}

// Every Flux-family configuration round-trips through its own tensor list
// in both namings, and is recognised as the variant it is.
func TestDeriveFluxFamily(t *testing.T) {
	depth := FluxDev()
	depth.InChannels, depth.OutCh = 128, 64
	smallChroma := Chroma()
	smallChroma.Hidden, smallChroma.MLP, smallChroma.DoubleBlocks, smallChroma.SingleBlocks = 256, 1024, 2, 3
	smallChroma.Approximator = Approximator{InDim: 64, Hidden: 96, Layers: 2}
	for _, tc := range []struct {
		name    string
		cfg     FluxConfig
		hint    string
		variant string
	}{
		{"dev", FluxDev(), "", "flux.1-dev"},
		{"schnell", FluxSchnell(), "", "flux.1-schnell"},
		{"kontext", FluxDev(), "FLUX.1-Kontext-dev", "flux.1-kontext-dev"},
		{"fill", fill(), "", "flux.1-fill-dev"},
		{"depth", depth, "", "flux.1-depth/canny-dev"},
		{"lite", lite(), "", "flux.1-dev (8 double + 38 single blocks, pruned or distilled (FLUX.1 has 19 + 38))"},
		{"chroma", Chroma(), "", "chroma"},
		{"chroma-small", smallChroma, "", "chroma (2 double + 3 single blocks, pruned or distilled (FLUX.1 has 19 + 38); hidden 256 (FLUX.1 has 3072))"},
	} {
		for _, l := range []Layout{FluxBFL, FluxDiffusers} {
			t.Run(tc.name+"/"+l.String(), func(t *testing.T) {
				if err := tc.cfg.Validate(); err != nil {
					t.Fatal(err)
				}
				got, d, err := DeriveFlux(l, shapesOf(t, tc.cfg, l))
				if err != nil {
					t.Fatal(err)
				}
				if got != tc.cfg {
					t.Errorf("got %+v\nwant %+v", got, tc.cfg)
				}
				if v := got.Variant(tc.hint); v != tc.variant {
					t.Errorf("variant %q, want %q", v, tc.variant)
				}
				for _, f := range []string{"hidden", "mlp", "head_dim", "in_channels", "context_dim"} {
					if d[f] == "" || strings.HasPrefix(d[f], "absent") {
						t.Errorf("derivation of %s: %q", f, d[f])
					}
				}
				if tc.cfg.Chroma && !strings.HasPrefix(d["vec_dim"], "absent") {
					t.Errorf("chroma vec_dim derivation %q", d["vec_dim"])
				}
			})
		}
	}
}

// A model without top-level layers (a BFL file without vector_in, a
// blocks-only slice) still yields the widths its layers have; the missing
// ones are 0 and say so.
func TestDeriveFluxMissingTopLevel(t *testing.T) {
	shapes := shapesOf(t, FluxSample(), FluxBFL)
	delete(shapes, "vector_in.in_layer.weight")
	delete(shapes, "vector_in.out_layer.weight")
	c, d, err := DeriveFlux(FluxBFL, shapes)
	if err != nil {
		t.Fatal(err)
	}
	if c.VecDim != 0 || c.Hidden != 256 || c.MLP != 1024 || !strings.Contains(d["vec_dim"], "vector_in.in_layer.weight") {
		t.Errorf("without vector_in: %+v, vec_dim %q", c, d["vec_dim"])
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "vec_dim") {
		t.Errorf("validate without vector_in: %v", err)
	}
	if _, err := c.RowMaps(); err != nil {
		t.Errorf("row maps without vector_in: %v", err)
	}

	for _, l := range []Layout{FluxBFL, FluxDiffusers} {
		blocks := map[string][]int{}
		for n, s := range shapesOf(t, FluxSample(), l) {
			if strings.HasPrefix(n, "single_") && !strings.Contains(n, "norm") {
				blocks[n] = s
			}
		}
		c, d, err := DeriveFlux(l, blocks)
		if err != nil {
			t.Fatal(err)
		}
		if c.Hidden != 256 || c.MLP != 1024 || c.SingleBlocks != 4 || c.DoubleBlocks != 0 {
			t.Errorf("%s single blocks only: %+v (%v)", l, c, d)
		}
	}
}
