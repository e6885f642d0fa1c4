package render

import (
	"encoding/binary"
	"math"
	"slices"
	"strings"
	"testing"
)

func f32Bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func u16Bytes(v []uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}

// A FLUX.1 latent packed 2×2 over a 1×2 token grid (a 2×4 latent): token t
// holds 64 features f, valued 1000·t + f. By the packing rule (feature
// f = c·4 + dy·2 + dx of token (y, x) is pixel (2y+dy, 2x+dx) of channel c),
// worked out by hand:
//
//	channel 0:  [   0    1 1000 1001]     channel 15: [  60   61 1060 1061]
//	            [   2    3 1002 1003]                 [  62   63 1062 1063]
//	channel 7:  [  28   29 1028 1029]
//	            [  30   31 1030 1031]
func TestUnpackHandComputed2x2(t *testing.T) {
	want := map[int][]float32{
		0:  {0, 1, 1000, 1001, 2, 3, 1002, 1003},
		7:  {28, 29, 1028, 1029, 30, 31, 1030, 1031},
		15: {60, 61, 1060, 1061, 62, 63, 1062, 1063},
	}
	tokens := make([]float32, 2*64) // [1, 2, 64]: batch, tokens, features
	for tok := range 2 {
		for f := range 64 {
			tokens[tok*64+f] = float32(1000*tok + f)
		}
	}
	// The same latent channel-major, [64, 1, 2]: value at (k, y, x) is the
	// feature k of token x.
	planes := make([]float32, 64*2)
	for k := range 64 {
		for x := range 2 {
			planes[k*2+x] = float32(1000*x + k)
		}
	}
	latents := map[string]Latent{
		"token-major [1 2 64]":      {Data: f32Bytes(tokens), DType: Float32, Shape: []int{1, 2, 64}, Layout: TokenMajor, GridH: 1, GridW: 2},
		"channel-major [1 64 1 2]":  {Data: f32Bytes(planes), DType: Float32, Shape: []int{1, 64, 1, 2}, Layout: ChannelMajor},
		"channel-major [64 1 2] fp": {Data: f32Bytes(planes), DType: Float32, Shape: []int{64, 1, 2}, Layout: ChannelMajor},
	}
	for name, l := range latents {
		p, fam, err := Unpack(l, "")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if fam != FamilyFlux || p.C != 16 || p.H != 2 || p.W != 4 {
			t.Fatalf("%s: %s %d×%d×%d, want flux 16×2×4", name, fam, p.C, p.H, p.W)
		}
		for c, w := range want {
			if got := p.Data[c*8 : c*8+8]; !slices.Equal(got, w) {
				t.Errorf("%s channel %d: %v, want %v", name, c, got, w)
			}
		}
		// Every value lands exactly once.
		seen := map[float32]bool{}
		for _, v := range p.Data {
			seen[v] = true
		}
		if len(seen) != 128 {
			t.Errorf("%s: %d distinct values, want 128", name, len(seen))
		}
	}
}

// A FLUX.2 latent packed to 128 channels over a square 2×2 token grid
// (grid inferred): feature f of token t lands at channel f/4.
func TestUnpackFlux2SquareTokens(t *testing.T) {
	tokens := make([]float32, 4*128)
	for tok := range 4 {
		for f := range 128 {
			tokens[tok*128+f] = float32(1000*tok + f)
		}
	}
	p, fam, err := Unpack(Latent{Data: f32Bytes(tokens), DType: Float32, Shape: []int{4, 128}, Layout: TokenMajor}, "")
	if err != nil {
		t.Fatal(err)
	}
	if fam != FamilyFlux2 || p.C != 32 || p.H != 4 || p.W != 4 {
		t.Fatalf("%s %d×%d×%d, want flux2 32×4×4", fam, p.C, p.H, p.W)
	}
	// Channel 31, pixel (3, 2): token (1, 1) = 3, feature 31·4 + 1·2 + 0 = 126.
	if got := p.Data[31*16+3*4+2]; got != 3126 {
		t.Fatalf("channel 31 pixel (3,2) = %v, want 3126", got)
	}
}

// Latents in each dtype read the same values (the conversions themselves
// are shared/half's, tested there against torch).
func TestUnpackDTypes(t *testing.T) {
	inf := float32(math.Inf(1))
	want := []float32{1, -2, 0.25, 0, 3, -0.5, inf, 1}
	for _, l := range []Latent{
		{Data: f32Bytes(want), DType: Float32},
		{Data: u16Bytes([]uint16{0x3f80, 0xc000, 0x3e80, 0, 0x4040, 0xbf00, 0x7f80, 0x3f80}), DType: BFloat16},
		{Data: u16Bytes([]uint16{0x3c00, 0xc000, 0x3400, 0, 0x4200, 0xb800, 0x7c00, 0x3c00}), DType: Float16},
	} {
		l.Shape, l.Layout = []int{32, 1, 1}, ChannelMajor
		l.Data = append(l.Data, make([]byte, 24*l.DType.Size())...)
		p, _, err := Unpack(l, FamilyFlux2)
		if err != nil {
			t.Fatalf("%v: %v", l.DType, err)
		}
		if !slices.Equal(p.Data[:8], want) {
			t.Errorf("%v: %v, want %v", l.DType, p.Data[:8], want)
		}
	}
}

func TestUnpackRejectsBadInput(t *testing.T) {
	ok := Latent{Data: make([]byte, 4*4*2*2), DType: Float32, Shape: []int{4, 2, 2}, Layout: ChannelMajor}
	mod := func(f func(*Latent)) Latent { l := ok; l.Shape = slices.Clone(ok.Shape); f(&l); return l }
	cases := []struct {
		name string
		l    Latent
		fam  Family
		want string
	}{
		{"short data", mod(func(l *Latent) { l.Data = l.Data[:60] }), FamilySD15, "latent shape [4 2 2] float32: 16 elements need 64 bytes, have 60"},
		{"zero dim", mod(func(l *Latent) { l.Shape = []int{4, 0, 2} }), FamilySD15, "dimension 1 is 0"},
		{"negative dim", mod(func(l *Latent) { l.Shape = []int{4, -2, -2} }), FamilySD15, "dimension 1 is -2"},
		{"huge", mod(func(l *Latent) { l.Shape = []int{1 << 20, 1 << 20, 4} }), FamilySD15, "more than"},
		{"dtype", mod(func(l *Latent) { l.DType = 9 }), FamilySD15, "latent dtype: dtype(9) unsupported"},
		{"layout", mod(func(l *Latent) { l.Layout = 7 }), FamilySD15, "latent layout: layout(7) unknown"},
		{"rank", mod(func(l *Latent) { l.Shape = []int{16} }), FamilySD15, "channel-major wants [C H W] or [B C H W]"},
		{"ambiguous", ok, "", "4 channels: ambiguous between sd15 and sdxl"},
		{"wrong family", ok, FamilySD3, "family sd3: 4 channels, want 16"},
		{"tokens not square", Latent{Data: make([]byte, 4*3*64), DType: Float32, Shape: []int{3, 64}, Layout: TokenMajor}, "", "3 tokens are not a square grid"},
		{"grid mismatch", Latent{Data: make([]byte, 4*4*64), DType: Float32, Shape: []int{4, 64}, Layout: TokenMajor, GridH: 1, GridW: 3}, "", "token grid 1×3 does not hold 4 tokens"},
		{"token rank", Latent{Data: make([]byte, 4*4*64), DType: Float32, Shape: []int{1, 1, 4, 64}, Layout: TokenMajor}, "", "token-major wants [N F] or [B N F]"},
	}
	for _, c := range cases {
		_, _, err := Unpack(c.l, c.fam)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want %q", c.name, err, c.want)
		}
	}
}
