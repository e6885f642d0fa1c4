package half

import (
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/arenahost/arenahost/internal/testenv"
)

// TestFP8AgainstTorch compares the 8-bit conversions with torch's CPU
// conversions: every pattern widened, and ~1.2M float32 values (random bit
// patterns, values around each format's range, exact ties, boundaries and
// specials) narrowed with .to(torch.float8_e4m3fn / float8_e5m2). Every
// result must be bit-identical, NaN included.
func TestFP8AgainstTorch(t *testing.T) {
	py := testenv.TorchPython(t)
	dir := t.TempDir()
	testenv.RunPython(t, py, filepath.Join("testdata", "torch_fp8.py"), dir)
	in := readF32(t, filepath.Join(dir, "f8_in.f32"))
	for _, tc := range []struct {
		name        string
		all, narrow string
		widen       func(uint8) float32
		conv        func(float32) uint8
		enc         func([]byte, []float32) int
		dec         func([]float32, []byte) int
	}{
		{"E4M3", "e4m3_all.f32", "f8_in.e4m3", F8E4M3ToF32, F32ToF8E4M3, EncodeF8E4M3, DecodeF8E4M3},
		{"E5M2", "e5m2_all.f32", "f8_in.e5m2", F8E5M2ToF32, F32ToF8E5M2, EncodeF8E5M2, DecodeF8E5M2},
	} {
		want := readF32(t, filepath.Join(dir, tc.all))
		if len(want) != 256 {
			t.Fatalf("%s: %d widened values, want 256", tc.name, len(want))
		}
		all := make([]byte, 256)
		for p := range all {
			all[p] = byte(p)
		}
		got := make([]float32, 256)
		if n := tc.dec(got, all); n != 256 {
			t.Fatalf("%s: bulk decode converted %d of 256", tc.name, n)
		}
		for p := range 256 {
			g, w := tc.widen(uint8(p)), want[p]
			if math.Float32bits(g) != math.Float32bits(w) {
				if w != w && g != g {
					t.Logf("%s(%#02x): NaN %#08x, torch NaN %#08x", tc.name, p, math.Float32bits(g), math.Float32bits(w))
					continue
				}
				t.Errorf("%s→F32(%#02x) = %v (%#08x), torch %v (%#08x)", tc.name, p, g, math.Float32bits(g), w, math.Float32bits(w))
			}
			if math.Float32bits(got[p]) != math.Float32bits(g) {
				t.Errorf("%s bulk decode(%#02x) = %#08x, scalar %#08x", tc.name, p, math.Float32bits(got[p]), math.Float32bits(g))
			}
		}
		nar, err := os.ReadFile(filepath.Join(dir, tc.narrow))
		if err != nil {
			t.Fatal(err)
		}
		if len(nar) != len(in) {
			t.Fatalf("%s: %d outputs for %d inputs", tc.name, len(nar), len(in))
		}
		buf := make([]byte, len(in))
		if n := tc.enc(buf, in); n != len(in) {
			t.Fatalf("%s: bulk encode converted %d of %d", tc.name, n, len(in))
		}
		bad := 0
		for i, f := range in {
			g := tc.conv(f)
			if g != nar[i] {
				if bad < 8 {
					t.Errorf("F32→%s(%v, %#08x) = %#02x, torch %#02x", tc.name, f, math.Float32bits(f), g, nar[i])
				}
				bad++
			}
			if buf[i] != g {
				t.Fatalf("%s bulk encode[%d] = %#02x, scalar %#02x", tc.name, i, buf[i], g)
			}
		}
		if bad > 0 {
			t.Errorf("F32→%s: %d of %d values differ from torch", tc.name, bad, len(in))
		}
	}
}

// TestFP8Rules checks, without torch, the rules the formats are chosen
// for: every non-NaN pattern survives widening then narrowing, E4M3 has no
// infinity and saturates at ±448 (torch 2.15), E5M2 overflows to ±Inf.
func TestFP8Rules(t *testing.T) {
	for p := range 256 {
		b := uint8(p)
		if f := F8E4M3ToF32(b); f == f && F32ToF8E4M3(f) != b {
			t.Errorf("E4M3 %#02x → %v → %#02x", b, f, F32ToF8E4M3(f))
		}
		if f := F8E5M2ToF32(b); f == f && F32ToF8E5M2(f) != b {
			t.Errorf("E5M2 %#02x → %v → %#02x", b, f, F32ToF8E5M2(f))
		}
	}
	for _, tc := range []struct {
		f    float32
		e4m3 uint8
		e5m2 uint8
	}{
		{448, 0x7e, 0x5f}, {-448, 0xfe, 0xdf}, {470, 0x7e, 0x5f}, {480, 0x7e, 0x60}, {float32(math.Inf(1)), 0x7e, 0x7c},
		{float32(math.Inf(-1)), 0xfe, 0xfc}, {float32(math.NaN()), 0x7f, 0x7f}, {57344, 0x7e, 0x7b}, {1e9, 0x7e, 0x7c}, {0, 0, 0},
		{float32(math.Copysign(0, -1)), 0x80, 0x80}, {1, 0x38, 0x3c}, {0.001953125, 0x01, 0x18},
	} {
		if g := F32ToF8E4M3(tc.f); g != tc.e4m3 {
			t.Errorf("F32ToF8E4M3(%v) = %#02x, want %#02x", tc.f, g, tc.e4m3)
		}
		if g := F32ToF8E5M2(tc.f); g != tc.e5m2 {
			t.Errorf("F32ToF8E5M2(%v) = %#02x, want %#02x", tc.f, g, tc.e5m2)
		}
	}
}
