package render

import (
	"fmt"
	"image"
	"math"
	"runtime"
	"sync"

	"github.com/arenahost/arenahost/shared/preview/previewwire"
)

// Filter is the resampling used from latent resolution to the output size.
type Filter uint8

// The filters.
const (
	// Nearest repeats each latent pixel: the cheapest, and at the default ×8
	// it shows the latent grid exactly.
	Nearest Filter = iota
	// Bilinear interpolates between latent pixel centres (half-pixel
	// alignment, edges clamped), like PIL/torch bilinear without antialias.
	Bilinear
)

// ParseFilter reads a filter name ("nearest" or "bilinear").
func ParseFilter(s string) (Filter, error) {
	for _, f := range []Filter{Nearest, Bilinear} {
		if s == f.String() {
			return f, nil
		}
	}
	return 0, fmt.Errorf("filter %q unknown (want nearest or bilinear)", s)
}

func (f Filter) String() string {
	switch f {
	case Nearest:
		return "nearest"
	case Bilinear:
		return "bilinear"
	}
	return fmt.Sprintf("filter(%d)", uint8(f))
}

const (
	// DefaultScale is the output pixels per (unpacked) latent pixel: the VAE's
	// spatial factor, so that by default the preview has the image's size.
	DefaultScale = 8
	// DefaultMaxSide caps the longer output side when Options.MaxSide is 0.
	// 512 is ComfyUI's --preview-size default. Render + JPEG of a 1024² FLUX
	// latent costs ~12 ms of CPU at 512² but ~25 ms at the full 1024² (JPEG
	// alone ~19 ms, split over the cores), so the full size only fits the
	// 30 ms preview budget with both of 2 cores free (BenchmarkRenderFlux).
	// Jobs that want the image size ask for it with MaxSide.
	DefaultMaxSide = previewwire.DefaultMaxSide
	// MaxSideLimit is the largest output side Render accepts.
	MaxSideLimit = previewwire.MaxSideLimit
)

// Options are one job's render settings. The zero value renders at ×8
// capped to DefaultMaxSide with the nearest filter and the family detected
// from the channel count.
type Options struct {
	// Family names the model family; "" detects it from the channel count,
	// which fails where the count is ambiguous (4 and 16 channels).
	Family Family
	// MaxSide caps the longer output side, keeping the aspect ratio; 0 means
	// DefaultMaxSide.
	MaxSide int
	// Scale is the output pixels per unpacked latent pixel before the cap; 0
	// means DefaultScale (the full image size). 1 gives the latent resolution.
	Scale int
	// Filter is the upscaling filter.
	Filter Filter
	// Decoder, when set, renders with a TAESD-family decoder instead of the
	// factors: the latent is area-averaged down to DecoderLatentSide on its
	// longer side, decoded (8× that), and resized to the output size.
	Decoder *Decoder
	// DecoderLatentSide is the latent side the decoder runs at; 0 means
	// DefaultDecoderLatentSide. At most MaxDecoderLatentSide.
	DecoderLatentSide int
}

// Validate checks the options without a latent, so that a job with bad
// preview settings is refused when it is created rather than at its first
// frame. The family may still turn out not to match the latent's channels.
func (o Options) Validate() error {
	if o.Family != "" {
		if _, ok := factorTables[o.Family]; !ok {
			return fmt.Errorf("options family: %q unknown (known: %v)", o.Family, Families())
		}
	}
	if o.Filter != Nearest && o.Filter != Bilinear {
		return fmt.Errorf("options filter: %v unknown", o.Filter)
	}
	if o.DecoderLatentSide < 0 || o.DecoderLatentSide > MaxDecoderLatentSide {
		return fmt.Errorf("options decoder latent side: %d out of range [1, %d]", o.DecoderLatentSide, MaxDecoderLatentSide)
	}
	_, _, err := o.OutputSize(1, 1)
	return err
}

// OutputSize is the preview size Render produces for an unpacked latent of
// h×w pixels under o.
func (o Options) OutputSize(h, w int) (oh, ow int, err error) {
	scale, maxSide := o.Scale, o.MaxSide
	if scale == 0 {
		scale = DefaultScale
	}
	if maxSide == 0 {
		maxSide = DefaultMaxSide
	}
	if scale < 1 || scale > MaxSideLimit {
		return 0, 0, fmt.Errorf("options scale: %d out of range [1, %d]", o.Scale, MaxSideLimit)
	}
	if maxSide < 1 || maxSide > MaxSideLimit {
		return 0, 0, fmt.Errorf("options max side: %d out of range [1, %d]", o.MaxSide, MaxSideLimit)
	}
	if h <= 0 || w <= 0 {
		return 0, 0, fmt.Errorf("latent size %d×%d: empty", h, w)
	}
	oh, ow = h*scale, w*scale // h, w ≤ maxElements and scale ≤ 8192: no overflow
	if long := max(oh, ow); long > maxSide {
		s := float64(maxSide) / float64(long)
		oh = max(1, int(math.Round(float64(oh)*s)))
		ow = max(1, int(math.Round(float64(ow)*s)))
	}
	return oh, ow, nil
}

// Render turns the first batch item of a latent into an opaque RGBA preview
// with the family's factors (ComfyUI's Latent2RGB: rgb = xᵀ·F + b, then
// clamp((rgb+1)/2, 0, 1)·255). Unlike ComfyUI, which truncates, values are
// rounded to the nearest byte (ComfyUI PR #8258 notes the ½-LSB dark bias of
// truncation); NaN renders as 0 (middle grey). The latent is only read.
func Render(l Latent, o Options) (*image.RGBA, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	p, f, err := unpack(l, o.Family)
	if err != nil {
		return nil, err
	}
	oh, ow, err := o.OutputSize(p.H, p.W)
	if err != nil {
		return nil, err
	}
	rgb, h, w := []float32(nil), p.H, p.W
	if o.Decoder == nil {
		rgb = latentToRGB(p, f)
	} else {
		side := o.DecoderLatentSide
		if side == 0 {
			side = DefaultDecoderLatentSide
		}
		img, err := o.Decoder.Decode(shrink(p, side))
		if err != nil {
			return nil, err
		}
		h, w = img.H, img.W
		rgb = interleaveUnit(img)
	}
	img := image.NewRGBA(image.Rect(0, 0, ow, oh))
	if o.Filter == Nearest {
		resizeNearest(img, rgb, h, w)
	} else {
		resizeBilinear(img, rgb, h, w)
	}
	return img, nil
}

// interleaveUnit turns a 3-plane decoder output into interleaved RGB
// clamped to [0, 1] (NaN to 0.5).
func interleaveUnit(p Planes) []float32 {
	hw := p.H * p.W
	out := make([]float32, 3*hw)
	for c := range 3 {
		for i, v := range p.Data[c*hw : (c+1)*hw] {
			out[3*i+c] = unit(2*v - 1)
		}
	}
	return out
}

// latentToRGB applies the factors and maps [-1, 1] to [0, 1] (clamped),
// returning interleaved RGB floats at latent resolution.
func latentToRGB(p Planes, f Factors) []float32 {
	hw := p.H * p.W
	acc := make([]float32, 3*hw)
	r, g, b := acc[:hw], acc[hw:2*hw], acc[2*hw:]
	for i := range hw {
		r[i], g[i], b[i] = f.Bias[0], f.Bias[1], f.Bias[2]
	}
	for c, row := range f.RGB {
		plane := p.Data[c*hw : (c+1)*hw]
		fr, fg, fb := row[0], row[1], row[2]
		for i, v := range plane {
			r[i] += v * fr
			g[i] += v * fg
			b[i] += v * fb
		}
	}
	out := make([]float32, 3*hw)
	for i := range hw {
		out[3*i] = unit(r[i])
		out[3*i+1] = unit(g[i])
		out[3*i+2] = unit(b[i])
	}
	return out
}

// unit maps [-1, 1] to [0, 1], clamping; NaN maps to 0.5.
func unit(v float32) float32 {
	v = (v + 1) / 2
	switch {
	case v >= 0 && v <= 1:
		return v
	case v > 1:
		return 1
	case v < 0:
		return 0
	}
	return 0.5
}

func toByte(v float32) uint8 { return uint8(v*255 + 0.5) }

// resizeNearest fills img from latent-resolution RGB, repeating pixels.
func resizeNearest(img *image.RGBA, rgb []float32, h, w int) {
	oh, ow := img.Rect.Dy(), img.Rect.Dx()
	xmap := make([]int, ow)
	for x := range xmap {
		xmap[x] = min(w-1, int((float64(x)+0.5)*float64(w)/float64(ow)))
	}
	row8 := make([]uint8, 4*w)
	prev := -1
	for y := range oh {
		sy := min(h-1, int((float64(y)+0.5)*float64(h)/float64(oh)))
		dst := img.Pix[y*img.Stride : y*img.Stride+4*ow]
		if sy == prev {
			copy(dst, img.Pix[(y-1)*img.Stride:(y-1)*img.Stride+4*ow])
			continue
		}
		prev = sy
		src := rgb[3*sy*w : 3*(sy+1)*w]
		for x := range w {
			row8[4*x] = toByte(src[3*x])
			row8[4*x+1] = toByte(src[3*x+1])
			row8[4*x+2] = toByte(src[3*x+2])
			row8[4*x+3] = 0xff
		}
		for x, sx := range xmap {
			copy(dst[4*x:4*x+4], row8[4*sx:4*sx+4])
		}
	}
}

// taps are the two source indices and the weight of the second for one
// output coordinate of a half-pixel-aligned linear resampling.
type taps struct {
	i0, i1 int
	w1     float32
}

func linearTaps(out, in int) []taps {
	t := make([]taps, out)
	for o := range t {
		s := (float64(o)+0.5)*float64(in)/float64(out) - 0.5
		s = max(0, min(float64(in-1), s))
		i0 := int(s)
		t[o] = taps{i0: i0, i1: min(in-1, i0+1), w1: float32(s - float64(i0))}
	}
	return t
}

// resizeBilinear fills img from latent-resolution RGB by bilinear
// interpolation, splitting the rows among the available cores.
func resizeBilinear(img *image.RGBA, rgb []float32, h, w int) {
	oh, ow := img.Rect.Dy(), img.Rect.Dx()
	xt, yt := linearTaps(ow, w), linearTaps(oh, h)
	workers := min(runtime.GOMAXPROCS(0), max(1, oh*ow/(128*1024)))
	var wg sync.WaitGroup
	for k := range workers {
		y0, y1 := oh*k/workers, oh*(k+1)/workers
		wg.Go(func() { bilinearRows(img, rgb, w, xt, yt, y0, y1) })
	}
	wg.Wait()
}

func bilinearRows(img *image.RGBA, rgb []float32, w int, xt, yt []taps, y0, y1 int) {
	ow := len(xt)
	// Horizontally resampled source rows, cached by source row index.
	rows := [2][]float32{make([]float32, 3*ow), make([]float32, 3*ow)}
	have := [2]int{-1, -1}
	hrow := func(sy int) []float32 {
		for i := range have {
			if have[i] == sy {
				return rows[i]
			}
		}
		// Replace the row that is not the other tap's (rows only move down).
		i := 0
		if have[0] > have[1] {
			i = 1
		}
		have[i] = sy
		src := rgb[3*sy*w : 3*(sy+1)*w]
		dst := rows[i]
		for x, t := range xt {
			a, b := src[3*t.i0:3*t.i0+3], src[3*t.i1:3*t.i1+3]
			dst[3*x] = a[0] + (b[0]-a[0])*t.w1
			dst[3*x+1] = a[1] + (b[1]-a[1])*t.w1
			dst[3*x+2] = a[2] + (b[2]-a[2])*t.w1
		}
		return dst
	}
	for y := y0; y < y1; y++ {
		t := yt[y]
		a := hrow(t.i0)
		b := hrow(t.i1)
		dst := img.Pix[y*img.Stride : y*img.Stride+4*ow]
		for x := range ow {
			dst[4*x] = toByte(a[3*x] + (b[3*x]-a[3*x])*t.w1)
			dst[4*x+1] = toByte(a[3*x+1] + (b[3*x+1]-a[3*x+1])*t.w1)
			dst[4*x+2] = toByte(a[3*x+2] + (b[3*x+2]-a[3*x+2])*t.w1)
			dst[4*x+3] = 0xff
		}
	}
}
