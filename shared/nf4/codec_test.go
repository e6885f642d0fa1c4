package nf4

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/arenahost/arenahost/shared/half"
)

// The CUDA dQuantizeNF4 literals, sorted; each must equal the fp32
// midpoint of neighbouring codes.
var cudaNF4Literals = []float64{
	-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
	-0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
	0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
	0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
}

func TestThresholdsAreCUDALiterals(t *testing.T) {
	for k, lit := range cudaNF4Literals {
		if nf4Thresholds[k] != float32(lit) {
			t.Errorf("threshold %d = %#08x, CUDA literal %#08x", k, math.Float32bits(nf4Thresholds[k]), math.Float32bits(float32(lit)))
		}
	}
}

// cudaNF4Tree is dQuantizeNF4 transcribed literally, the reference the
// branch-free search must equal.
func cudaNF4Tree(x float32) byte {
	l := func(i int) float32 { return float32(cudaNF4Literals[i]) }
	if x > l(7) {
		if x > l(11) {
			if x > l(13) {
				if x > l(14) {
					return 15
				}
				return 14
			}
			if x > l(12) {
				return 13
			}
			return 12
		}
		if x > l(9) {
			if x > l(10) {
				return 11
			}
			return 10
		}
		if x > l(8) {
			return 9
		}
		return 8
	}
	if x > l(3) {
		if x > l(5) {
			if x > l(6) {
				return 7
			}
			return 6
		}
		if x > l(4) {
			return 5
		}
		return 4
	}
	if x > l(1) {
		if x > l(2) {
			return 3
		}
		return 2
	}
	if x > l(0) {
		return 1
	}
	return 0
}

// TestNF4Buckets checks every one of the 65536 buckets at both ends, the
// middle, and around every threshold against the definition.
func TestNF4Buckets(t *testing.T) {
	for p := range 1 << 16 {
		for _, low := range []uint32{0, 1, 0x7fff, 0x8000, 0xfffe, 0xffff} {
			x := math.Float32frombits(uint32(p)<<16 | low)
			if x != x {
				continue
			}
			if g, w := quantizeNF4(x), nf4Count(x); g != w {
				t.Fatalf("quantizeNF4(%#08x) = %d, definition %d", math.Float32bits(x), g, w)
			}
		}
	}
}

func TestQuantizeNF4MatchesTree(t *testing.T) {
	var xs []float32
	for _, th := range nf4Thresholds[:15] {
		xs = append(xs, th, math.Nextafter32(th, -2), math.Nextafter32(th, 2))
	}
	xs = append(xs, -1, 1, 0, float32(math.Copysign(0, -1)), float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)), -1.5, 1.5)
	r := rand.New(rand.NewPCG(1, 2))
	for range 200000 {
		xs = append(xs, r.Float32()*2.2-1.1)
	}
	for _, x := range xs {
		if g, w := quantizeNF4(x), cudaNF4Tree(x); g != w {
			t.Fatalf("quantizeNF4(%v) = %d, CUDA tree %d", x, g, w)
		}
	}
	// Ties go to the lower code; NaN to 0.
	if q := quantizeNF4(nf4Thresholds[3]); q != 3 {
		t.Errorf("tie at threshold 3 gave %d, want 3", q)
	}
	if q := quantizeNF4(float32(math.NaN())); q != 0 {
		t.Errorf("NaN gave %d, want 0", q)
	}
}

func TestQuantizeFP4(t *testing.T) {
	tests := []struct {
		x    float32
		want byte
	}{
		{0, 0}, {float32(math.Copysign(0, -1)), 0}, {float32(math.NaN()), 0},
		{1, 0b0011}, {-1, 0b1011}, {0.8333333, 0b0010}, {0.84, 0b0011},
		{0.5, 0b101}, {0.3, 0b100}, {0.25, 0b0111}, {0.1, 0b0110}, {0.01, 0b0001}, {0.002, 0},
		{-0.002, 0b1000}, {-0.5, 0b1101},
	}
	for _, tc := range tests {
		if g := quantizeFP4(tc.x); g != tc.want {
			t.Errorf("quantizeFP4(%v) = %04b, want %04b", tc.x, g, tc.want)
		}
	}
	// Every code decodes to a value that quantizes back to itself (±0 aside).
	for c := range 16 {
		if c == 8 {
			continue
		}
		if g := quantizeFP4(FP4[c]); g != byte(c) {
			t.Errorf("quantizeFP4(FP4[%d]=%v) = %d", c, FP4[c], g)
		}
	}
}

func TestQuantizePackingAndPadding(t *testing.T) {
	// 5 elements, blocksize 64: absmax 1, codes high nibble first, pad 7.
	src := []float32{-1, 1, 0, 0.5626170039176941, -0.09105003625154495}
	packed := make([]byte, 3)
	absmax := make([]float32, 1)
	Quantize(packed, absmax, src, 64, QuantNF4)
	if want := []byte{0x0f, 0x7d, 0x67}; !slices.Equal(packed, want) {
		t.Errorf("packed = % x, want % x", packed, want)
	}
	if absmax[0] != 1 {
		t.Errorf("absmax = %v", absmax)
	}
	out := make([]float32, 5)
	Dequantize(out, packed, absmax, &NF4, 5, 64)
	if !slices.Equal(out, src) {
		t.Errorf("dequantized %v, want %v", out, src)
	}
}

// TestAllZeroBlock checks the CUDA rule on its own: absmax 0, 1/0 = Inf,
// 0*Inf = NaN, so every code is 0 (bytes 0x00, the padding nibble too) and
// decodes to -1*0 = -0.0. bnb's CPU backend writes 0x77 instead; the
// project follows CUDA.
func TestAllZeroBlock(t *testing.T) {
	for _, n := range []int{64, 65, 7} {
		src := make([]float32, n)
		packed := make([]byte, PackedLen(n))
		for i := range packed {
			packed[i] = 0xAA
		}
		absmax := make([]float32, Blocks(n, 64))
		Quantize(packed, absmax, src, 64, QuantNF4)
		for i, b := range packed {
			if b != 0 {
				t.Fatalf("n=%d: byte %d = %#02x, want 0x00", n, i, b)
			}
		}
		for _, a := range absmax {
			if a != 0 {
				t.Fatalf("n=%d: absmax %v, want 0", n, absmax)
			}
		}
		out := make([]float32, n)
		Dequantize(out, packed, absmax, &NF4, n, 64)
		for i, v := range out {
			if math.Float32bits(v) != 0x80000000 {
				t.Fatalf("n=%d: out[%d] = %#08x, want -0.0", n, i, math.Float32bits(v))
			}
		}
	}
	// A zero block next to a non-zero one: only the zero block is 0x00.
	src := make([]float32, 128)
	src[64] = 0.5
	packed := make([]byte, 64)
	absmax := make([]float32, 2)
	Quantize(packed, absmax, src, 64, QuantNF4)
	if packed[0] != 0 || packed[32] != 0xf7 || packed[33] != 0x77 {
		t.Errorf("packed[0,32,33] = %#02x %#02x %#02x, want 00 f7 77", packed[0], packed[32], packed[33])
	}
}

// TestQuantizeReciprocal checks that scaling multiplies by float32(1/absmax)
// rather than dividing: find x where the two differ across a threshold.
func TestQuantizeReciprocal(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	found := 0
	for range 2000000 {
		am := r.Float32()*3 + 0.01
		x := nf4Thresholds[r.IntN(15)] * am
		x = math.Nextafter32(x, float32(r.IntN(2)*2-1))
		mul := quantizeNF4(float32(x * float32(1/am)))
		div := quantizeNF4(x / am)
		if mul == div || math.Abs(float64(x)) >= float64(am) {
			continue
		}
		found++
		src := []float32{am, x}
		packed := make([]byte, 1)
		absmax := make([]float32, 1)
		Quantize(packed, absmax, src, 64, QuantNF4)
		if packed[0]&15 != mul {
			t.Fatalf("x=%v am=%v: code %d, reciprocal rule %d, division %d", x, am, packed[0]&15, mul, div)
		}
		if found == 20 {
			break
		}
	}
	if found == 0 {
		t.Fatal("no input separates the reciprocal and division rules")
	}
}

func TestRoundTripParallel(t *testing.T) {
	// Large enough to use the worker pool; compare with a serial run.
	r := rand.New(rand.NewPCG(5, 6))
	n := 300001
	src := make([]float32, n)
	for i := range src {
		src[i] = float32(r.NormFloat64() * 0.03)
	}
	for _, qt := range []QuantType{QuantNF4, QuantFP4} {
		for _, bs := range []int{32, 64, 4096} {
			packed := make([]byte, PackedLen(n))
			absmax := make([]float32, Blocks(n, bs))
			Quantize(packed, absmax, src, bs, qt)
			sp := make([]byte, PackedLen(n))
			for b := range absmax {
				lo, hi := b*bs, min(b*bs+bs, n)
				if am := quantizeBlock(sp[lo/2:(hi+1)/2], src[lo:hi], qt == QuantFP4); am != absmax[b] {
					t.Fatalf("%s bs=%d block %d: absmax %v vs %v", qt, bs, b, am, absmax[b])
				}
			}
			if !slices.Equal(sp, packed) {
				t.Fatalf("%s bs=%d: parallel and serial quantize differ", qt, bs)
			}
			out := make([]float32, n)
			Dequantize(out, packed, absmax, qt.Table(), n, bs)
			for _, dt := range []DType{BFloat16, Float16, Float32} {
				b := make([]byte, n*dt.Size())
				DequantizeTo(b, dt, packed, absmax, qt.Table(), n, bs)
				for i := 0; i < n; i += 997 {
					var want []byte
					switch dt {
					case BFloat16:
						h := half.F32ToBF16(out[i])
						want = []byte{byte(h), byte(h >> 8)}
					case Float16:
						h := half.F32ToF16(out[i])
						want = []byte{byte(h), byte(h >> 8)}
					default:
						u := math.Float32bits(out[i])
						want = []byte{byte(u), byte(u >> 8), byte(u >> 16), byte(u >> 24)}
					}
					if got := b[i*dt.Size() : (i+1)*dt.Size()]; !slices.Equal(got, want) {
						t.Fatalf("%s %s element %d: % x, want % x", qt, dt, i, got, want)
					}
				}
			}
			// Error stays within half a code gap of the block's absmax.
			for i := 0; i < n; i += 101 {
				am := absmax[i/bs]
				if d := math.Abs(float64(out[i] - src[i])); d > 0.21*float64(am) {
					t.Fatalf("%s bs=%d element %d: |%v - %v| too large for absmax %v", qt, bs, i, out[i], src[i], am)
				}
			}
		}
	}
}

func TestDynamicMap(t *testing.T) {
	m := DynamicMap()
	if m[127] != 0 || m[255] != 1 || m[0] != -0.99296875 {
		t.Errorf("m[0,127,255] = %v %v %v", m[0], m[127], m[255])
	}
	if !slices.IsSorted(m[:]) {
		t.Error("dynamic map not ascending")
	}
	for i := 1; i < 127; i++ {
		if m[127+i] != -m[127-i] {
			t.Errorf("m[%d]=%v is not -m[%d]=%v", 127+i, m[127+i], 127-i, m[127-i])
		}
	}
}

// bruteNearest returns the set of codes at minimal distance from x.
func bruteNearest(m *[256]float32, x float32) (best float64) {
	best = math.Inf(1)
	for _, v := range m {
		best = min(best, math.Abs(float64(v)-float64(x)))
	}
	return best
}

func TestQuantizeDynamicNearest(t *testing.T) {
	m := DynamicMap()
	r := rand.New(rand.NewPCG(7, 8))
	for range 100000 {
		x := r.Float32()*2 - 1
		q := QuantizeDynamic(&m, x)
		if d := math.Abs(float64(m[q]) - float64(x)); d > bruteNearest(&m, x)*1.000001+1e-12 {
			t.Fatalf("x=%v: code %d (%v) is not nearest", x, q, m[q])
		}
	}
	for _, x := range m {
		if q := QuantizeDynamic(&m, x); m[q] != x {
			t.Errorf("exact map value %v gave code %d (%v)", x, q, m[q])
		}
	}
	if q := QuantizeDynamic(&m, float32(math.NaN())); q != 0 {
		t.Errorf("NaN gave %d, want 0", q)
	}
	if q := QuantizeDynamic(&m, -1); q != 0 {
		t.Errorf("-1 gave %d, want 0", q)
	}
}

func TestNestedRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	absmax := make([]float32, 1000)
	for i := range absmax {
		absmax[i] = r.Float32()*0.1 + 0.01
	}
	q, nabs, off := QuantizeNested(absmax)
	if len(q) != 1000 || len(nabs) != 4 {
		t.Fatalf("len q %d nabs %d", len(q), len(nabs))
	}
	m := DynamicMap()
	got := make([]float32, len(q))
	DequantizeNested(got, q, nabs, &m, off, NestedBlocksize)
	for i := range got {
		if d := math.Abs(float64(got[i] - absmax[i])); d > 0.02*float64(nabs[i/256])+1e-7 {
			t.Fatalf("absmax[%d] %v rebuilt as %v", i, absmax[i], got[i])
		}
	}
	// All absmax equal: every a' is 0, nested absmax 0, codes 0, rebuilt exactly.
	same := []float32{0.25, 0.25, 0.25}
	q, nabs, off = QuantizeNested(same)
	if off != 0.25 || nabs[0] != 0 || !slices.Equal(q, []byte{0, 0, 0}) {
		t.Fatalf("constant absmax: q %v nabs %v off %v", q, nabs, off)
	}
	DequantizeNested(got[:3], q, nabs, &m, off, NestedBlocksize)
	if !slices.Equal(got[:3], same) {
		t.Errorf("constant absmax rebuilt as %v", got[:3])
	}
}

// TestQuantizeNestedInto: re-encoding with a given offset and the stored
// map is the dQuantize search over that map, whether the map is the
// dynamic one (bucket table) or one whose entries a torch build rounded
// differently (plain search), and writes only into the caller's slices.
func TestQuantizeNestedInto(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	absmax := make([]float32, 700) // 3 nested blocks, the last partial
	for i := range absmax {
		absmax[i] = float32(math.Exp(r.NormFloat64())) * 0.01
	}
	dyn := DynamicMap()
	nudged := dyn // still sorted, far enough off to move codes
	for i := 1; i < 255; i += 2 {
		if i != 127 {
			nudged[i] += 0.3 * (dyn[i+1] - dyn[i])
		}
	}
	for _, tc := range []struct {
		name   string
		code   [256]float32
		offset float32
	}{
		{"dynamic map, mean offset", dyn, Mean(absmax)},
		{"dynamic map, stale offset", dyn, 0.004},
		{"nudged map, stale offset", nudged, 0.004},
		{"nudged map, zero offset", nudged, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := make([]byte, len(absmax)+5) // longer than needed: the tail stays untouched
			nabs := make([]float32, 3)
			for i := range q {
				q[i] = 0xAB
			}
			QuantizeNestedInto(q, nabs, absmax, tc.offset, &tc.code)
			for c := range nabs {
				lo, hi := c*NestedBlocksize, min((c+1)*NestedBlocksize, len(absmax))
				var am float32
				for _, a := range absmax[lo:hi] {
					am = max(am, float32(math.Abs(float64(a-tc.offset))))
				}
				if nabs[c] != am {
					t.Fatalf("nested absmax[%d] = %v, want %v", c, nabs[c], am)
				}
				for i := lo; i < hi; i++ {
					if want := QuantizeDynamic(&tc.code, float32(float32(absmax[i]-tc.offset)*float32(1/am))); q[i] != want {
						t.Fatalf("code[%d] = %d, want %d", i, q[i], want)
					}
				}
			}
			for i := len(absmax); i < len(q); i++ {
				if q[i] != 0xAB {
					t.Fatalf("byte %d past the codes written", i)
				}
			}
			got := make([]float32, len(absmax))
			DequantizeNested(got, q[:len(absmax)], nabs, &tc.code, tc.offset, NestedBlocksize)
			for i := range got {
				if d := math.Abs(float64(got[i] - absmax[i])); d > 0.02*float64(nabs[i/NestedBlocksize]) {
					t.Fatalf("absmax[%d] %v rebuilt as %v", i, absmax[i], got[i])
				}
			}
		})
	}
}

func TestMeanSmall(t *testing.T) {
	for _, tc := range []struct {
		x    []float32
		want float32
	}{
		{[]float32{1}, 1}, {[]float32{1, 2, 3, 4}, 2.5}, {[]float32{0.5, 0.25, 0.25, 1, 1, 1, 1, 1, 1, 2}, 0.9},
	} {
		if g := Mean(tc.x); g != tc.want {
			t.Errorf("Mean(%v) = %v, want %v", tc.x, g, tc.want)
		}
	}
	if g := Mean(nil); g == g {
		t.Errorf("Mean(nil) = %v, want NaN", g)
	}
}

// TestDequantizeSpecialAbsmax: an Inf or NaN absmax produces NaN products
// (0*Inf), which convert like torch's vectorised .to(bfloat16): 0xFFFF.
func TestDequantizeSpecialAbsmax(t *testing.T) {
	packed := []byte{0x7f, 0x08}
	for _, am := range []float32{float32(math.Inf(1)), float32(math.NaN())} {
		out := make([]byte, 8)
		DequantizeTo(out, BFloat16, packed, []float32{am}, &NF4, 4, 64)
		f := make([]float32, 4)
		Dequantize(f, packed, []float32{am}, &NF4, 4, 64)
		for i := range 4 {
			got := uint16(out[2*i]) | uint16(out[2*i+1])<<8
			if want := half.F32ToBF16(f[i]); got != want {
				t.Errorf("absmax %v element %d: bf16 %#04x, want %#04x (f32 %v)", am, i, got, want, f[i])
			}
		}
	}
}

// TestDynamicBuckets checks the bucket table against the binary search at
// both ends and the middle of every bucket, around every map entry and
// midpoint, and on random values.
func TestDynamicBuckets(t *testing.T) {
	b := dynamicBuckets()
	m := DynamicMap()
	slow := 0
	check := func(x float32) {
		if g, w := b.quantize(x), QuantizeDynamic(&m, x); g != w {
			t.Fatalf("bucket quantize(%v = %#08x) = %d, binary search %d", x, math.Float32bits(x), g, w)
		}
	}
	for p := range uint32(1 << 16) {
		if b.slow[p] {
			slow++
		}
		for _, low := range []uint32{0, 1, 0x7fff, 0x8000, 0xfffe, 0xffff} {
			check(fromKey(p<<16 | low))
		}
		if b.thr[p] != math.MaxUint32 && !b.slow[p] {
			check(fromKey(b.thr[p]))
			check(fromKey(b.thr[p] - 1))
		}
	}
	for i := range 255 {
		mid := float32(float32(m[i]+m[i+1]) * 0.5)
		for _, x := range []float32{m[i], mid, math.Nextafter32(mid, -2), math.Nextafter32(mid, 2)} {
			check(x)
		}
	}
	r := rand.New(rand.NewPCG(13, 14))
	for range 200000 {
		check(r.Float32()*2.2 - 1.1)
		check(math.Float32frombits(r.Uint32()))
	}
	t.Logf("%d of 65536 buckets use the binary search", slow)
}

func TestRoundTo(t *testing.T) {
	// 1 + 2^-10 is exact in float16 but not in bfloat16 (7 fraction bits),
	// where it rounds to 1 (tie-free: below the halfway point 1 + 2^-8).
	x := float32(1 + 1.0/1024)
	tests := []struct {
		dt   DType
		want float32
	}{
		{BFloat16, 1},
		{Float16, x},
		{Float32, x},
	}
	for _, tc := range tests {
		t.Run(string(tc.dt), func(t *testing.T) {
			v := []float32{x, -x}
			RoundTo(v, tc.dt)
			if v[0] != tc.want || v[1] != -tc.want {
				t.Fatalf("RoundTo(%v, %s) = %v, want ±%v", x, tc.dt, v, tc.want)
			}
		})
	}
}
