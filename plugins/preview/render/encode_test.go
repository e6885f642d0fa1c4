package render

import (
	"bytes"
	"image"
	"image/jpeg"
	"image/png"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func TestEncodeDecodesToExpectedSize(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	img, err := Render(randomLatent(r, []int{1, 16, 40, 64}, ChannelMajor), Options{Family: FamilyFlux})
	if err != nil {
		t.Fatal(err)
	}
	if img.Rect.Dx() != 512 || img.Rect.Dy() != 320 {
		t.Fatalf("render size %v, want 512×320", img.Rect)
	}
	for _, f := range []Format{{Kind: JPEG}, {Kind: JPEG, Quality: 40}, {Kind: JPEG, Quality: 100}, {Kind: PNG}} {
		b, err := Encode(img, f)
		if err != nil {
			t.Fatalf("%+v: %v", f, err)
		}
		var dec image.Image
		switch f.Kind {
		case JPEG:
			if !bytes.HasPrefix(b, []byte{0xff, 0xd8}) {
				t.Fatalf("jpeg: no SOI marker")
			}
			dec, err = jpeg.Decode(bytes.NewReader(b))
		case PNG:
			dec, err = png.Decode(bytes.NewReader(b))
		}
		if err != nil {
			t.Fatalf("%+v: decode: %v", f, err)
		}
		if dec.Bounds() != img.Rect {
			t.Fatalf("%+v: decoded %v, want %v", f, dec.Bounds(), img.Rect)
		}
		if f.Kind == PNG {
			// Lossless: the decoded pixels are the rendered ones.
			got := image.NewRGBA(dec.Bounds())
			for y := range dec.Bounds().Dy() {
				for x := range dec.Bounds().Dx() {
					got.Set(x, y, dec.At(x, y))
				}
			}
			if !slices.Equal(got.Pix, img.Pix) {
				t.Fatal("png: decoded pixels differ")
			}
		}
	}
}

func TestEncodeRejectsBadFormat(t *testing.T) {
	img := image.NewRGBA(image.Rect(0, 0, 4, 4))
	cases := []struct {
		img  image.Image
		f    Format
		want string
	}{
		{img, Format{Kind: JPEG, Quality: 101}, "encode jpeg: quality 101 out of range"},
		{img, Format{Kind: JPEG, Quality: -5}, "quality -5"},
		{img, Format{Kind: 0}, "encode: format kind kind(0) unknown"},
		{image.NewRGBA(image.Rect(0, 0, 0, 3)), Format{Kind: PNG}, "encode png: empty image"},
		{nil, Format{Kind: JPEG}, "empty image"},
	}
	for _, c := range cases {
		if _, err := Encode(c.img, c.f); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: err %v, want %q", c.f, err, c.want)
		}
	}
	if JPEG.MIME() != "image/jpeg" || PNG.MIME() != "image/png" || JPEG != 1 || PNG != 2 {
		t.Fatal("kinds must match ComfyUI's image_type numbers and MIME types")
	}
}
