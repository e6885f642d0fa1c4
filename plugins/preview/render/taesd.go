package render

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// TAESD decoder (madebyollin/taesd taesd.py, Decoder): an nn.Sequential whose
// indices are the weight file's keys:
//
//	0 Clamp tanh(x/3)·3 · 1 conv(C→64)+b · 2 ReLU · 3,4,5 Block · 6 Upsample×2
//	7 conv(64→64) · 8,9,10 Block · 11 Upsample · 12 conv · 13,14,15 Block
//	16 Upsample · 17 conv · 18 Block · 19 conv(64→3)+b
//
// Block(x) = ReLU(conv.4(ReLU(conv.2(ReLU(conv.0(x))))) + x), all 3×3 with
// bias. Output is an image in [0, 1] (clamped) at 8× the latent size.
const (
	taesdWidth = 64
	// MaxDecoderLatentSide bounds the latent a Decoder accepts (1024² out;
	// about 0.75 GiB of activations).
	MaxDecoderLatentSide = 128
	// DefaultDecoderLatentSide is the latent side the TAESD path shrinks a
	// latent to (area average) before decoding when Options.DecoderLatentSide
	// is 0. The decoder costs 282.8 GMAC for a 128² latent (1024² out) and
	// scales with the latent area: a 16² latent is 4.4 GMAC, about 250 ms of
	// CPU with the AVX2 kernel (BenchmarkDecoder), so ~125 ms on 2 cores,
	// within the 200 ms preview budget; 24² already needs ~540 ms of CPU. The
	// 128² decoded image is then resized to the output size (bilinear
	// recommended).
	DefaultDecoderLatentSide = 16
)

var (
	taesdStages   = [4][]int{{3, 4, 5}, {8, 9, 10}, {13, 14, 15}, {18}}
	taesdUpConvs  = [3]int{7, 12, 17}
	taesdPoolKey  = "3.pool.0.weight"
	taesdKeyShift = map[string]int{"": 0, "decoder.": 0, "taesd_decoder.": 0, "decoder.layers.": -1}
)

type taesdBlock struct{ c0, c2, c4 conv3 }

// Decoder is a loaded TAESD-family decoder (taesd, taesdxl, taesd3, taef1).
// It is immutable and safe for concurrent use.
type Decoder struct {
	name     string
	channels int
	first    conv3
	stages   [4][]taesdBlock
	up       [3]conv3
	last     conv3
}

// Name is the weights file the decoder came from.
func (d *Decoder) Name() string { return d.name }

// LatentChannels is the latent channel count the decoder takes (4 for
// taesd/taesdxl, 16 for taesd3/taef1).
func (d *Decoder) LatentChannels() int { return d.channels }

// LoadDecoder reads a TAESD decoder from a .safetensors file holding the
// decoder's state dict under madebyollin/taesd's keys ("1.weight",
// "3.conv.0.weight", … "19.bias", optionally prefixed "decoder." or
// "taesd_decoder.") or diffusers AutoencoderTiny's ("decoder.layers.0.weight"
// …, index shifted by one). Weights may be F32, F16 or BF16.
func LoadDecoder(path string) (*Decoder, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load decoder: %w", err)
	}
	d, err := ParseDecoder(filepath.Base(path), b)
	if err != nil {
		return nil, fmt.Errorf("load decoder %s: %w", path, err)
	}
	return d, nil
}

// ParseDecoder builds a decoder from the bytes of a safetensors file; name
// labels it in errors and Name.
func ParseDecoder(name string, b []byte) (*Decoder, error) {
	ts, err := readSafetensors(b)
	if err != nil {
		return nil, err
	}
	prefix, shift := "", 0
	found := false
	for _, p := range []string{"", "decoder.", "taesd_decoder.", "decoder.layers."} {
		if _, ok := ts[fmt.Sprintf("%s%d.weight", p, 1+taesdKeyShift[p])]; ok {
			prefix, shift, found = p, taesdKeyShift[p], true
			break
		}
	}
	if !found {
		keys := make([]string, 0, len(ts))
		for k := range ts {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if len(keys) > 5 {
			keys = append(keys[:5], "…")
		}
		return nil, fmt.Errorf("tensor 1.weight: not found (no TAESD decoder keys; file has %s)", strings.Join(keys, ", "))
	}
	key := func(idx int, suffix string) string { return fmt.Sprintf("%s%d.%s", prefix, idx+shift, suffix) }
	if _, ok := ts[key(3, "pool.0.weight")]; ok {
		return nil, fmt.Errorf("tensor %s: TAEF2-style GroupNorm pool blocks are not supported (taesd, taesdxl, taesd3 and taef1 are)", prefix+taesdPoolKey)
	}
	get := func(name string, shape ...int) ([]float32, error) {
		t, ok := ts[name]
		if !ok {
			return nil, fmt.Errorf("tensor %s: not found", name)
		}
		if !slices.Equal(t.shape, shape) {
			return nil, fmt.Errorf("tensor %s: shape %v, want %v", name, t.shape, shape)
		}
		return t.data, nil
	}
	conv := func(idx int, sub string, cin, cout int, withBias bool) (conv3, error) {
		w, err := get(key(idx, sub+"weight"), cout, cin, 3, 3)
		if err != nil {
			return conv3{}, err
		}
		var b []float32
		if withBias {
			if b, err = get(key(idx, sub+"bias"), cout); err != nil {
				return conv3{}, err
			}
		}
		return newConv3(cin, cout, w, b), nil
	}
	first := ts[key(1, "weight")]
	if len(first.shape) != 4 || first.shape[0] != taesdWidth || first.shape[1] < 1 || first.shape[1] > 64 {
		return nil, fmt.Errorf("tensor %s: shape %v, want [64 C 3 3]", key(1, "weight"), first.shape)
	}
	d := &Decoder{name: name, channels: first.shape[1]}
	if d.first, err = conv(1, "", d.channels, taesdWidth, true); err != nil {
		return nil, err
	}
	for s, idxs := range taesdStages {
		for _, idx := range idxs {
			var blk taesdBlock
			for i, c := range []*conv3{&blk.c0, &blk.c2, &blk.c4} {
				if *c, err = conv(idx, fmt.Sprintf("conv.%d.", 2*i), taesdWidth, taesdWidth, true); err != nil {
					return nil, err
				}
			}
			d.stages[s] = append(d.stages[s], blk)
		}
	}
	for i, idx := range taesdUpConvs {
		if d.up[i], err = conv(idx, "", taesdWidth, taesdWidth, false); err != nil {
			return nil, err
		}
	}
	if d.last, err = conv(19, "", taesdWidth, 3, true); err != nil {
		return nil, err
	}
	return d, nil
}

// Decode runs the decoder on unpacked latent planes (model latent space) and
// returns the raw 3-channel output at 8× the size, before the [0, 1] clamp.
func (d *Decoder) Decode(p Planes) (Planes, error) {
	if p.C != d.channels {
		return Planes{}, fmt.Errorf("decoder %s: latent has %d channels, decoder takes %d", d.name, p.C, d.channels)
	}
	if p.H < 1 || p.W < 1 || p.H > MaxDecoderLatentSide || p.W > MaxDecoderLatentSide {
		return Planes{}, fmt.Errorf("decoder %s: latent %d×%d outside 1..%d per side", d.name, p.H, p.W, MaxDecoderLatentSide)
	}
	if len(p.Data) != p.C*p.H*p.W {
		return Planes{}, fmt.Errorf("decoder %s: latent %d×%d×%d holds %d values", d.name, p.C, p.H, p.W, len(p.Data))
	}
	// Three maps of the largest (8×) size, reused at every resolution.
	maxN := fmapLen(taesdWidth, 8*p.H, 8*p.W)
	bufs := [3][]float32{make([]float32, maxN), make([]float32, maxN), make([]float32, maxN)}
	at := func(i, h, w int) fmap { return fmapOn(bufs[i], taesdWidth, h, w) }

	h, w := p.H, p.W
	in := fmapOn(make([]float32, fmapLen(p.C, h, w)), p.C, h, w)
	for c := range p.C {
		for y := range h {
			row := in.d[c*in.plane()+(y+1)*in.stride()+1:]
			for x, v := range p.Data[(c*h+y)*w : (c*h+y+1)*w] {
				row[x] = softClamp(v)
			}
		}
	}
	x, t1, t2 := 0, 1, 2
	cur := at(x, h, w)
	d.first.apply(in, cur, nil, true)
	for s := range d.stages {
		if s > 0 {
			up := at(t1, 2*h, 2*w)
			upsample2(cur, up)
			h, w = 2*h, 2*w
			cur = at(x, h, w)
			d.up[s-1].apply(up, cur, nil, false)
		}
		for _, blk := range d.stages[s] {
			a, b := at(t1, h, w), at(t2, h, w)
			blk.c0.apply(cur, a, nil, true)
			blk.c2.apply(a, b, nil, true)
			blk.c4.apply(b, a, &cur, true)
			x, t1 = t1, x
			cur = a
		}
	}
	out := fmapOn(make([]float32, fmapLen(3, h, w)), 3, h, w)
	d.last.apply(cur, out, nil, false)
	img := Planes{C: 3, H: h, W: w, Data: make([]float32, 3*h*w)}
	for c := range 3 {
		for y := range h {
			o := c*out.plane() + (y+1)*out.stride() + 1
			copy(img.Data[(c*h+y)*w:(c*h+y+1)*w], out.d[o:o+w])
		}
	}
	return img, nil
}

// shrink area-averages planes so that the longer side is at most side
// (torch's adaptive average pooling windows).
func shrink(p Planes, side int) Planes {
	if max(p.H, p.W) <= side {
		return p
	}
	s := float64(side) / float64(max(p.H, p.W))
	oh, ow := max(1, int(float64(p.H)*s+0.5)), max(1, int(float64(p.W)*s+0.5))
	out := Planes{C: p.C, H: oh, W: ow, Data: make([]float32, p.C*oh*ow)}
	win := func(i, out, in int) (int, int) { return i * in / out, ((i+1)*in + out - 1) / out }
	for c := range p.C {
		src := p.Data[c*p.H*p.W:]
		for oy := range oh {
			y0, y1 := win(oy, oh, p.H)
			for ox := range ow {
				x0, x1 := win(ox, ow, p.W)
				var sum float32
				for y := y0; y < y1; y++ {
					for _, v := range src[y*p.W+x0 : y*p.W+x1] {
						sum += v
					}
				}
				out.Data[c*oh*ow+oy*ow+ox] = sum / float32((y1-y0)*(x1-x0))
			}
		}
	}
	return out
}
