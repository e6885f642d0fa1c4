package render

import (
	"math"
	"runtime"
	"sync"
	"sync/atomic"
)

// fmap is a channel-major fp32 feature map stored with a one-pixel zero
// border, so that a 3×3 convolution reads its taps straight from memory
// (no im2col copy): pixel (c, y, x) is d[c·plane + (y+1)·stride + x+1] with
// stride = w+2 and plane = (h+2)·stride. The slice runs fmapSlack values
// past the last plane so a 16-pixel strip may overrun the last row (the
// overrun only feeds output pixels that are discarded).
type fmap struct {
	c, h, w int
	d       []float32
}

const fmapSlack = 32

func fmapLen(c, h, w int) int { return c*(h+2)*(w+2) + fmapSlack }

func (m fmap) stride() int { return m.w + 2 }
func (m fmap) plane() int  { return (m.h + 2) * (m.w + 2) }

// fmapOn lays a c×h×w map over buf (len ≥ fmapLen) and zeroes its border.
func fmapOn(buf []float32, c, h, w int) fmap {
	m := fmap{c, h, w, buf[:fmapLen(c, h, w)]}
	s, p := m.stride(), m.plane()
	for ch := range c {
		pl := m.d[ch*p : (ch+1)*p]
		clear(pl[:s])
		clear(pl[(h+1)*s:])
		for y := 1; y <= h; y++ {
			pl[y*s] = 0
			pl[y*s+w+1] = 0
		}
	}
	return m
}

// tileRows is the micro-kernel's output channels per call (its tile is
// tileRows channels × 16 pixels).
const tileRows = 6

// conv3 is a 3×3, stride 1, zero-padding 1 convolution with its weights
// packed for the micro-kernel: w[g][k][r] is the weight of output channel
// tileRows·g+r at k = ci·9 + ky·3 + kx (output channels padded with zeros to
// a multiple of tileRows).
type conv3 struct {
	cin, cout int
	w         []float32
	bias      []float32 // len cout; zeros where the layer has none
}

// newConv3 packs torch-layout weights [cout][cin][3][3] and an optional bias.
func newConv3(cin, cout int, w, bias []float32) conv3 {
	groups := (cout + tileRows - 1) / tileRows
	k := cin * 9
	p := make([]float32, groups*k*tileRows)
	for co := range cout {
		g, r := co/tileRows, co%tileRows
		for kk := range k {
			p[(g*k+kk)*tileRows+r] = w[co*k+kk]
		}
	}
	b := make([]float32, cout)
	copy(b, bias)
	return conv3{cin: cin, cout: cout, w: p, bias: b}
}

// apply writes act(conv(in) + bias [+ res]) into the interior of out (same
// h×w as in, cout channels; res like out). Output rows are shared among the
// cores; for each strip of 16 output pixels of a row, the kernel multiplies
// every group of tileRows output channels by the 9·cin taps read in place.
func (cv *conv3) apply(in fmap, out fmap, res *fmap, relu bool) {
	h, w := in.h, in.w
	s, pl := in.stride(), in.plane()
	k := cv.cin * 9
	off := make([]int32, k)
	for ci := range cv.cin {
		for ky := range 3 {
			for kx := range 3 {
				off[ci*9+ky*3+kx] = int32(ci*pl + ky*s + kx)
			}
		}
	}
	groups := (cv.cout + tileRows - 1) / tileRows
	workers := min(runtime.GOMAXPROCS(0), h)
	// Rows go out in contiguous chunks, so that a core reuses the input rows
	// its previous output row loaded into its cache, while the chunks stay
	// small enough to balance the cores.
	chunk := max(1, h/(4*workers))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			var tile [tileRows * 16]float32
			for {
				y0 := int(next.Add(1)-1) * chunk
				if y0 >= h {
					return
				}
				for y := y0; y < min(h, y0+chunk); y++ {
					for x0 := 0; x0 < w; x0 += 16 {
						// Tap (ky=0, kx=0) of output (y, x0) is padded (y, x0).
						base := in.d[y*s+x0:]
						n := min(16, w-x0)
						for g := range groups {
							gemm(cv.w[g*k*tileRows:(g+1)*k*tileRows], base, off, &tile)
							for r := range tileRows {
								co := tileRows*g + r
								if co >= cv.cout {
									break
								}
								o := co*pl + (y+1)*s + x0 + 1
								dst := out.d[o : o+n]
								acc := tile[r*16 : r*16+n]
								bias := cv.bias[co]
								if res != nil {
									rs := res.d[o : o+n]
									for j := range dst {
										dst[j] = acc[j] + bias + rs[j]
									}
								} else {
									for j := range dst {
										dst[j] = acc[j] + bias
									}
								}
								if relu {
									for j, v := range dst {
										dst[j] = max(v, 0)
									}
								}
							}
						}
					}
				}
			}
		})
	}
	wg.Wait()
}

// gemmGo is the portable micro-kernel:
// c[r·16+j] = Σ_k a[tileRows·k+r]·b[off[k]+j].
func gemmGo(a, b []float32, off []int32, c *[tileRows * 16]float32) {
	var acc [tileRows * 16]float32
	for kk, o := range off {
		av := a[tileRows*kk : tileRows*kk+tileRows : tileRows*kk+tileRows]
		bv := b[o : o+16 : o+16]
		for r, ar := range av {
			row := acc[r*16 : r*16+16 : r*16+16]
			for j, bj := range bv {
				row[j] += ar * bj
			}
		}
	}
	*c = acc
}

// upsample2 is nearest-neighbour ×2 upsampling into out's interior.
func upsample2(in, out fmap) {
	si, pi := in.stride(), in.plane()
	so, po := out.stride(), out.plane()
	for c := range in.c {
		for y := range in.h {
			src := in.d[c*pi+(y+1)*si+1 : c*pi+(y+1)*si+1+in.w]
			r0 := out.d[c*po+(2*y+1)*so+1 : c*po+(2*y+1)*so+1+out.w]
			for x, v := range src {
				r0[2*x], r0[2*x+1] = v, v
			}
			copy(out.d[c*po+(2*y+2)*so+1:c*po+(2*y+2)*so+1+out.w], r0)
		}
	}
}

// softClamp is TAESD's input Clamp: tanh(x/3)·3.
func softClamp(v float32) float32 { return float32(math.Tanh(float64(v)/3) * 3) }
