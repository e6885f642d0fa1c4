package render

import (
	"fmt"
	"math"

	"github.com/arenahost/arenahost/shared/half"
)

// DType is the element type of a latent's bytes (little-endian).
type DType uint8

// The element types a latent may come in.
const (
	Float32 DType = iota + 1
	BFloat16
	Float16
)

// Size is the element size in bytes (0 for an unknown type).
func (d DType) Size() int {
	switch d {
	case Float32:
		return 4
	case BFloat16, Float16:
		return 2
	}
	return 0
}

func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case BFloat16:
		return "bfloat16"
	case Float16:
		return "float16"
	}
	return fmt.Sprintf("dtype(%d)", uint8(d))
}

// Layout says how a latent's shape is to be read.
type Layout uint8

// The layouts a latent may come in.
const (
	// ChannelMajor is [C, H, W] or [B, C, H, W] (NCHW). A latent with 4·C
	// channels of a packable family is packed 2×2: channel c·4+dy·2+dx at
	// (y, x) is pixel (2y+dy, 2x+dx) of channel c (ComfyUI's FLUX.2
	// latent_rgb_factors_reshape, diffusers' Flux2 _patchify_latents).
	ChannelMajor Layout = iota
	// TokenMajor is [N, F] or [B, N, F], diffusers' _pack_latents: token
	// t = y·GridW + x, feature f = c·4+dy·2+dx is pixel (2y+dy, 2x+dx) of
	// channel c. The token grid comes from Latent.GridH/GridW, or is taken as
	// square when they are zero.
	TokenMajor
)

func (l Layout) String() string {
	switch l {
	case ChannelMajor:
		return "channel-major"
	case TokenMajor:
		return "token-major"
	}
	return fmt.Sprintf("layout(%d)", uint8(l))
}

// Latent is one published latent: raw little-endian elements with their type,
// shape and layout. Render reads it and never writes to Data.
type Latent struct {
	Data   []byte
	DType  DType
	Shape  []int
	Layout Layout
	// GridH and GridW give the token grid of a TokenMajor latent (the packed
	// latent's height and width, i.e. the image size / 16). Zero means square.
	GridH, GridW int
}

// Planes is an fp32 latent, unpacked, channel-major: Data[c·H·W + y·W + x].
type Planes struct {
	C, H, W int
	Data    []float32
}

// maxElements bounds what one latent may hold (a 16384² FLUX.2 latent packed
// is 128·1024·1024 = 2^27), so that shape arithmetic can never overflow.
const maxElements = 1 << 30

// Unpack reads the first batch item of a latent as fp32 planes with the
// family's unpacked channel count, after checking the family (named, or
// detected from the channel count when fam is "") against the shape. It
// returns the family used.
func Unpack(l Latent, fam Family) (Planes, Family, error) {
	p, f, err := unpack(l, fam)
	return p, f.Family, err
}

func unpack(l Latent, fam Family) (Planes, Factors, error) {
	es := l.DType.Size()
	if es == 0 {
		return Planes{}, Factors{}, fmt.Errorf("latent dtype: %v unsupported (want float32, bfloat16 or float16)", l.DType)
	}
	n := 1
	for i, d := range l.Shape {
		if d <= 0 || d > maxElements {
			return Planes{}, Factors{}, fmt.Errorf("latent shape %v: dimension %d is %d", l.Shape, i, d)
		}
		n *= d
		if n > maxElements {
			return Planes{}, Factors{}, fmt.Errorf("latent shape %v: more than %d elements", l.Shape, maxElements)
		}
	}
	if len(l.Data) != n*es {
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v %v: %d elements need %d bytes, have %d", l.Shape, l.DType, n, n*es, len(l.Data))
	}
	switch l.Layout {
	case ChannelMajor:
		return unpackChannelMajor(l, fam)
	case TokenMajor:
		return unpackTokenMajor(l, fam)
	}
	return Planes{}, Factors{}, fmt.Errorf("latent layout: %v unknown", l.Layout)
}

func unpackChannelMajor(l Latent, fam Family) (Planes, Factors, error) {
	var c, h, w int
	switch len(l.Shape) {
	case 3:
		c, h, w = l.Shape[0], l.Shape[1], l.Shape[2]
	case 4:
		c, h, w = l.Shape[1], l.Shape[2], l.Shape[3]
	default:
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v: channel-major wants [C H W] or [B C H W]", l.Shape)
	}
	f, packed, err := resolve(fam, c, ChannelMajor)
	if err != nil {
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v: %w", l.Shape, err)
	}
	src := toFloat32(l.Data[:c*h*w*l.DType.Size()], l.DType)
	if !packed {
		return Planes{C: c, H: h, W: w, Data: src}, f, nil
	}
	uc, uh, uw := c/4, 2*h, 2*w
	dst := make([]float32, uc*uh*uw)
	hw := h * w
	for k := range c {
		ch, dy, dx := k/4, (k/2)%2, k%2
		plane := src[k*hw : (k+1)*hw]
		out := dst[ch*uh*uw:]
		for y := range h {
			row := out[(2*y+dy)*uw+dx:]
			in := plane[y*w : (y+1)*w]
			for x, v := range in {
				row[2*x] = v
			}
		}
	}
	return Planes{C: uc, H: uh, W: uw, Data: dst}, f, nil
}

func unpackTokenMajor(l Latent, fam Family) (Planes, Factors, error) {
	var n, feat int
	switch len(l.Shape) {
	case 2:
		n, feat = l.Shape[0], l.Shape[1]
	case 3:
		n, feat = l.Shape[1], l.Shape[2]
	default:
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v: token-major wants [N F] or [B N F]", l.Shape)
	}
	f, _, err := resolve(fam, feat, TokenMajor)
	if err != nil {
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v: %w", l.Shape, err)
	}
	gh, gw := l.GridH, l.GridW
	switch {
	case gh == 0 && gw == 0:
		s := int(math.Sqrt(float64(n)))
		for s*s > n {
			s--
		}
		for (s+1)*(s+1) <= n {
			s++
		}
		if s*s != n {
			return Planes{}, Factors{}, fmt.Errorf("latent shape %v: %d tokens are not a square grid; set the token grid (GridH, GridW)", l.Shape, n)
		}
		gh, gw = s, s
	case gh <= 0 || gw <= 0 || gh > n || gw > n || gh*gw != n:
		return Planes{}, Factors{}, fmt.Errorf("latent shape %v: token grid %d×%d does not hold %d tokens", l.Shape, gh, gw, n)
	}
	src := toFloat32(l.Data[:n*feat*l.DType.Size()], l.DType)
	uc, uh, uw := feat/4, 2*gh, 2*gw
	dst := make([]float32, uc*uh*uw)
	plane := uh * uw
	for y := range gh {
		for x := range gw {
			tok := src[(y*gw+x)*feat : (y*gw+x+1)*feat]
			base := 2*y*uw + 2*x
			for ch := range uc {
				o := ch*plane + base
				dst[o] = tok[ch*4]
				dst[o+1] = tok[ch*4+1]
				dst[o+uw] = tok[ch*4+2]
				dst[o+uw+1] = tok[ch*4+3]
			}
		}
	}
	return Planes{C: uc, H: uh, W: uw, Data: dst}, f, nil
}

// toFloat32 converts little-endian elements to fp32 (exactly, with
// shared/half's torch-matching rules for 16-bit values).
func toFloat32(b []byte, d DType) []float32 {
	out := make([]float32, len(b)/d.Size())
	switch d {
	case Float32:
		half.DecodeF32(out, b)
	case BFloat16:
		half.DecodeBF16(out, b)
	case Float16:
		half.DecodeF16(out, b)
	}
	return out
}
