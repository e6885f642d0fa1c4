package render

import (
	"bytes"
	"encoding/json"
	"image"
	"image/jpeg"
	"image/png"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
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

// Strips joined with restart markers decode to exactly the pixels of the
// one-piece encoding (the DCT blocks are the same; only DC prediction
// restarts), for odd sizes and strip counts too.
func TestEncodeJPEGStripsMatchesOnePiece(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	cases := []struct{ w, h, strips int }{{512, 512, 2}, {200, 97, 3}, {64, 40, 5}, {1024, 1024, 4}, {33, 16, 2}}
	for _, c := range cases {
		l := randomLatent(r, []int{4, (c.h + 7) / 8, (c.w + 7) / 8}, ChannelMajor)
		img, err := Render(l, Options{Family: FamilySDXL, Filter: Bilinear, MaxSide: 4096})
		if err != nil {
			t.Fatal(err)
		}
		img = img.SubImage(image.Rect(0, 0, c.w, c.h)).(*image.RGBA)
		var one bytes.Buffer
		if err := jpeg.Encode(&one, img, &jpeg.Options{Quality: 80}); err != nil {
			t.Fatal(err)
		}
		joined, err := encodeJPEGStrips(img, 80, c.strips)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		if c.h > 16 && !bytes.Contains(joined, []byte{0xff, 0xdd, 0, 4}) {
			t.Fatalf("%+v: no DRI segment", c)
		}
		a, err := jpeg.Decode(bytes.NewReader(one.Bytes()))
		if err != nil {
			t.Fatal(err)
		}
		b, err := jpeg.Decode(bytes.NewReader(joined))
		if err != nil {
			t.Fatalf("%+v: joined strips do not decode: %v", c, err)
		}
		ya, yb := a.(*image.YCbCr), b.(*image.YCbCr)
		if ya.Rect != yb.Rect || !slices.Equal(ya.Y, yb.Y) || !slices.Equal(ya.Cb, yb.Cb) || !slices.Equal(ya.Cr, yb.Cr) {
			t.Fatalf("%+v: joined strips decode differently from the one-piece JPEG (%v vs %v)", c, ya.Rect, yb.Rect)
		}
	}
}

// Pillow (libjpeg, zlib) decodes our PNG and our strip-joined JPEG (with
// enough strips for the RST0..7 numbering to wrap) to the expected size, and
// the joined JPEG to the same pixels as the one-piece encoding.
func TestEncodeDecodesWithPillow(t *testing.T) {
	python := testenv.TorchPython(t)
	r := rand.New(rand.NewPCG(13, 14))
	img, err := Render(randomLatent(r, []int{1, 16, 64, 40}, ChannelMajor), Options{Family: FamilyFlux, Filter: Bilinear})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	joined, err := encodeJPEGStrips(img, 85, 11)
	if err != nil {
		t.Fatal(err)
	}
	var one bytes.Buffer
	if err := jpeg.Encode(&one, img, &jpeg.Options{Quality: 85}); err != nil {
		t.Fatal(err)
	}
	pngBytes, err := Encode(img, Format{Kind: PNG})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"joined.jpg": joined, "one.jpg": one.Bytes(), "preview.png": pngBytes}
	var args []string
	for name, b := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, p)
	}
	slices.Sort(args)
	out := testenv.RunPython(t, python, append([]string{"testdata/pil_decode.py"}, args...)...)
	type decoded struct {
		File   string `json:"file"`
		Format string `json:"format"`
		Size   [2]int `json:"size"`
		SHA    string `json:"sha256"`
	}
	got := map[string]decoded{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var rec decoded
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("pillow output %q: %v", line, err)
		}
		got[filepath.Base(rec.File)] = rec
	}
	want := [2]int{320, 512}
	for name, format := range map[string]string{"joined.jpg": "JPEG", "one.jpg": "JPEG", "preview.png": "PNG"} {
		if g := got[name]; g.Format != format || g.Size != want {
			t.Errorf("%s: pillow reads %s %v, want %s %v", name, g.Format, g.Size, format, want)
		}
	}
	if got["joined.jpg"].SHA != got["one.jpg"].SHA {
		t.Error("pillow decodes the strip-joined JPEG differently from the one-piece JPEG")
	}
}
