package render

import (
	"testing"
)

// Arbitrary shapes, layouts, dtypes, grids and options give a result or an
// error, never a panic.
func FuzzRender(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4}, 4, 1, 1, 0, 0, uint8(1), uint8(0), 0, 0, uint8(0), 0, 0)
	f.Add(make([]byte, 4*64*4), 1, 4, 64, 0, 0, uint8(1), uint8(1), 2, 2, uint8(3), 512, 8)
	f.Add(make([]byte, 2*128*2*3), 128, 2, 3, 0, 3, uint8(2), uint8(0), 0, 0, uint8(0), 7, 1)
	f.Fuzz(func(t *testing.T, data []byte, d0, d1, d2, d3, rank int, dt, layout uint8, gh, gw int, fam uint8, maxSide, scale int) {
		dims := []int{d0, d1, d2, d3}
		for i := range dims {
			dims[i] = dims[i]%300 - 1 // small, sometimes 0 or negative
		}
		shape := dims[:rank&3+1]
		fams := append([]Family{""}, Families()...)
		l := Latent{Data: data, DType: DType(dt % 5), Shape: shape, Layout: Layout(layout % 3), GridH: gh % 64, GridW: gw % 64}
		o := Options{Family: fams[int(fam)%len(fams)], MaxSide: maxSide % 600, Scale: scale % 20, Filter: Filter(fam % 3)}
		img, err := Render(l, o)
		if err == nil && (img == nil || img.Rect.Empty()) {
			t.Fatalf("no error and no image for %+v %+v", shape, o)
		}
		if err == nil {
			if _, err := Encode(img, Format{Kind: Kind(dt%3 + 1)}); err != nil && dt%3+1 != 3 {
				t.Fatalf("encode: %v", err)
			}
		}
	})
}
