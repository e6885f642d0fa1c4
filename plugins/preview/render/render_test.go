package render

import (
	"image"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// oneHot is a c×h×w fp32 latent with value v in channel k and 0 elsewhere.
func oneHot(c, h, w, k int, v float32) Latent {
	d := make([]float32, c*h*w)
	for i := range h * w {
		d[k*h*w+i] = v
	}
	return Latent{Data: f32Bytes(d), DType: Float32, Shape: []int{1, c, h, w}, Layout: ChannelMajor}
}

// expected colour of a one-hot latent from the published numbers (the
// fixture), by ComfyUI's formula with rounding.
func expectRGB(row, bias [3]float64, v float64) [3]uint8 {
	var out [3]uint8
	for k := range 3 {
		x := (row[k]*v + bias[k] + 1) / 2
		x = math.Max(0, math.Min(1, x))
		out[k] = uint8(math.Floor(x*255 + 0.5))
	}
	return out
}

func pixel(img *image.RGBA, x, y int) [4]uint8 {
	o := img.PixOffset(x, y)
	return [4]uint8(img.Pix[o : o+4])
}

// Every channel of every family, one-hot at 1.0 (and at ±20 to exercise the
// clamp), renders the published row plus bias.
func TestRenderOneHotColours(t *testing.T) {
	fx := loadFixture(t)
	for _, fam := range Families() {
		want := fx[fam]
		for k, row := range want.Rows {
			for _, v := range []float32{1, 20, -20} {
				img, err := Render(oneHot(len(want.Rows), 2, 3, k, v), Options{Family: fam, Scale: 1})
				if err != nil {
					t.Fatal(err)
				}
				if img.Rect.Dx() != 3 || img.Rect.Dy() != 2 {
					t.Fatalf("%s: size %v, want 3×2", fam, img.Rect)
				}
				e := expectRGB(row, want.Bias, float64(v))
				for y := range 2 {
					for x := range 3 {
						if got := pixel(img, x, y); got != [4]uint8{e[0], e[1], e[2], 255} {
							t.Fatalf("%s channel %d = %v at (%d,%d): %v, want %v", fam, k, v, x, y, got, e)
						}
					}
				}
			}
		}
	}
}

// Two colours worked out by hand from the published rows.
func TestRenderHandComputedColours(t *testing.T) {
	cases := []struct {
		fam  Family
		c, k int
		want [4]uint8
	}{
		// SD15 row 3 [-0.2120, -0.2616, -0.7177], no bias: ((1+r)/2)·255 =
		// 100.47, 94.15, 35.99.
		{FamilySD15, 4, 3, [4]uint8{100, 94, 36, 255}},
		// Flux row 4 [0.0859, 0.0721, 0.0329] + bias [-0.0329, -0.0718,
		// -0.0851] = [0.0530, 0.0003, -0.0522]: 134.26, 127.54, 120.84.
		{FamilyFlux, 16, 4, [4]uint8{134, 128, 121, 255}},
	}
	for _, c := range cases {
		img, err := Render(oneHot(c.c, 1, 1, c.k, 1), Options{Family: c.fam, Scale: 1})
		if err != nil {
			t.Fatal(err)
		}
		if got := pixel(img, 0, 0); got != c.want {
			t.Errorf("%s channel %d: %v, want %v", c.fam, c.k, got, c.want)
		}
	}
	// NaN renders middle grey (0 after the factors), ±Inf clamps.
	nan := float32(math.NaN())
	img, err := Render(oneHot(4, 1, 1, 0, nan), Options{Family: FamilySD15, Scale: 1})
	if err != nil {
		t.Fatal(err)
	}
	if got := pixel(img, 0, 0); got != [4]uint8{128, 128, 128, 255} {
		t.Errorf("NaN latent: %v, want middle grey", got)
	}
}

func randomLatent(r *rand.Rand, shape []int, layout Layout) Latent {
	n := 1
	for _, d := range shape {
		n *= d
	}
	d := make([]float32, n)
	for i := range d {
		d[i] = float32(r.NormFloat64() * 2)
	}
	return Latent{Data: f32Bytes(d), DType: Float32, Shape: shape, Layout: layout}
}

func TestRenderOutputSize(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	flux := randomLatent(r, []int{1, 16, 128, 128}, ChannelMajor)
	packed := randomLatent(r, []int{1, 4096, 64}, TokenMajor)
	wide := randomLatent(r, []int{4, 64, 128}, ChannelMajor)
	cases := []struct {
		name   string
		l      Latent
		o      Options
		wh, ww int
	}{
		{"flux default cap", flux, Options{Family: FamilyFlux}, 512, 512},
		{"flux full size", flux, Options{Family: FamilyFlux, MaxSide: 1024}, 1024, 1024},
		{"flux latent size", flux, Options{Family: FamilyFlux, Scale: 1}, 128, 128},
		{"packed default", packed, Options{}, 512, 512},
		{"packed full size", packed, Options{MaxSide: 2048}, 1024, 1024},
		{"wide capped", wide, Options{Family: FamilySDXL}, 256, 512},
		{"wide bilinear", wide, Options{Family: FamilySDXL, Filter: Bilinear, MaxSide: 300}, 150, 300},
	}
	for _, c := range cases {
		img, err := Render(c.l, c.o)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if img.Rect.Dy() != c.wh || img.Rect.Dx() != c.ww {
			t.Errorf("%s: %d×%d, want %d×%d", c.name, img.Rect.Dx(), img.Rect.Dy(), c.ww, c.wh)
		}
	}
}

// At ×8 nearest, each output pixel is its latent pixel's colour; packed and
// unpacked forms of the same latent render the same image; the latent bytes
// are left untouched.
func TestRenderNearestMatchesLatentResolution(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	const c, h, w = 16, 6, 10
	l := randomLatent(r, []int{c, h, w}, ChannelMajor)
	before := slices.Clone(l.Data)
	small, err := Render(l, Options{Family: FamilyFlux, Scale: 1})
	if err != nil {
		t.Fatal(err)
	}
	big, err := Render(l, Options{Family: FamilyFlux, MaxSide: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(l.Data, before) {
		t.Fatal("Render wrote to the latent")
	}
	if big.Rect.Dx() != 8*w || big.Rect.Dy() != 8*h {
		t.Fatalf("size %v, want %d×%d", big.Rect, 8*w, 8*h)
	}
	for y := range 8 * h {
		for x := range 8 * w {
			if pixel(big, x, y) != pixel(small, x/8, y/8) {
				t.Fatalf("(%d,%d) = %v, latent pixel %v", x, y, pixel(big, x, y), pixel(small, x/8, y/8))
			}
		}
	}
	// Pack by the rule and render again: the same image.
	src := toFloat32(l.Data, Float32)
	tok := make([]float32, len(src))
	for ch := range c {
		for y := range h {
			for x := range w {
				t := (y/2)*(w/2) + x/2
				tok[t*64+ch*4+(y%2)*2+x%2] = src[ch*h*w+y*w+x]
			}
		}
	}
	packed := Latent{Data: f32Bytes(tok), DType: Float32, Shape: []int{(h / 2) * (w / 2), 64}, Layout: TokenMajor, GridH: h / 2, GridW: w / 2}
	again, err := Render(packed, Options{Scale: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(again.Pix, small.Pix) {
		t.Fatal("packed latent renders differently from the unpacked one")
	}
}

// Bilinear against a float64 reference of the same interpolation.
func TestRenderBilinear(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	const h, w = 3, 5
	l := randomLatent(r, []int{4, h, w}, ChannelMajor)
	o := Options{Family: FamilySDXL, Filter: Bilinear, MaxSide: 100, Scale: 7}
	img, err := Render(l, o)
	if err != nil {
		t.Fatal(err)
	}
	p, f, _ := unpack(l, FamilySDXL)
	at := func(y, x, k int) float64 {
		v := float64(f.Bias[k])
		for c := range 4 {
			v += float64(p.Data[c*h*w+y*w+x]) * float64(f.RGB[c][k])
		}
		return math.Max(0, math.Min(1, (v+1)/2))
	}
	src := func(o, n, in int) (int, int, float64) {
		s := math.Max(0, math.Min(float64(in-1), (float64(o)+0.5)*float64(in)/float64(n)-0.5))
		i0 := int(s)
		return i0, min(in-1, i0+1), s - float64(i0)
	}
	oh, ow := img.Rect.Dy(), img.Rect.Dx()
	if oh != 21 || ow != 35 {
		t.Fatalf("size %d×%d, want 35×21", ow, oh)
	}
	for y := range oh {
		y0, y1, wy := src(y, oh, h)
		for x := range ow {
			x0, x1, wx := src(x, ow, w)
			for k := range 3 {
				top := at(y0, x0, k)*(1-wx) + at(y0, x1, k)*wx
				bot := at(y1, x0, k)*(1-wx) + at(y1, x1, k)*wx
				want := (top*(1-wy) + bot*wy) * 255
				got := float64(pixel(img, x, y)[k])
				if math.Abs(got-want) > 0.51 {
					t.Fatalf("(%d,%d) channel %d: %v, want %.2f", x, y, k, got, want)
				}
			}
		}
	}
}

func TestRenderRejectsBadOptions(t *testing.T) {
	l := oneHot(4, 2, 2, 0, 1)
	cases := []struct {
		o    Options
		want string
	}{
		{Options{Family: FamilySD15, Filter: 9}, "options filter: filter(9) unknown"},
		{Options{Family: FamilySD15, MaxSide: -1}, "options max side: -1 out of range"},
		{Options{Family: FamilySD15, MaxSide: MaxSideLimit + 1}, "options max side"},
		{Options{Family: FamilySD15, Scale: -3}, "options scale: -3 out of range"},
		{Options{}, "ambiguous between sd15 and sdxl"},
		{Options{Family: "sd2"}, `options family: "sd2" unknown`},
		{Options{Family: FamilySD15, DecoderLatentSide: -1}, "options decoder latent side: -1"},
	}
	for _, c := range cases {
		if _, err := Render(l, c.o); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: err %v, want %q", c.o, err, c.want)
		}
	}
}

func TestValidateAndParse(t *testing.T) {
	if err := (Options{}).Validate(); err != nil {
		t.Fatalf("zero options: %v", err)
	}
	if err := (Options{Family: FamilyFlux2, MaxSide: 1024, Scale: 1, Filter: Bilinear, DecoderLatentSide: 32}).Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (Options{Family: "flux3"}).Validate(); err == nil {
		t.Fatal("unknown family accepted")
	}
	for s, want := range map[string]Filter{"nearest": Nearest, "bilinear": Bilinear} {
		if f, err := ParseFilter(s); err != nil || f != want {
			t.Errorf("ParseFilter(%q) = %v, %v", s, f, err)
		}
	}
	if _, err := ParseFilter("lanczos"); err == nil || !strings.Contains(err.Error(), `"lanczos" unknown`) {
		t.Errorf("ParseFilter(lanczos): %v", err)
	}
	for s, want := range map[string]Kind{"jpeg": JPEG, "jpg": JPEG, "png": PNG} {
		if k, err := ParseKind(s); err != nil || k != want {
			t.Errorf("ParseKind(%q) = %v, %v", s, k, err)
		}
	}
	if _, err := ParseKind("webp"); err == nil {
		t.Error("webp accepted")
	}
	for _, c := range []struct {
		f  Format
		ok bool
	}{{Format{Kind: JPEG}, true}, {Format{Kind: JPEG, Quality: 95}, true}, {Format{Kind: PNG, Quality: 7}, true},
		{Format{Kind: JPEG, Quality: 101}, false}, {Format{Kind: 0}, false}} {
		if err := c.f.Validate(); (err == nil) != c.ok {
			t.Errorf("%+v: %v", c.f, err)
		}
	}
}
