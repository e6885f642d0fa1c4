package gpu

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/gpu/internal/emutest"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
)

// The kernels run on the CPU here: kernels.cu compiled as host C++ with
// kernels/emu (a fiber per CUDA thread, each running until it waits at a
// barrier or a warp shuffle, so a missing barrier reads stale shared memory
// every time), driven by the same Calls the cuda build launches, and compared
// bit for bit with shared/nf4 and shared/lora. This checks the kernels'
// indexing, tiling, barriers and rounding, and the launch plans, without a
// GPU; the GPU check (arenahost-gpucheck) repeats it on real hardware.

// image is emulated device memory (emutest.Image): pointers are offsets
// into it.
type image struct {
	t *testing.T
	*emutest.Image
}

func newImage(t *testing.T) *image { return &image{t: t, Image: emutest.NewImage()} }

func (m *image) alloc(n int) DevicePtr { return DevicePtr(m.Alloc(n)) }

func (m *image) put(b []byte) DevicePtr { return DevicePtr(m.Put(b)) }

func (m *image) putF32(v []float32) DevicePtr { return m.put(emutest.F32LE(v)) }

func (m *image) get(p DevicePtr, n int) []byte { return m.Get(uint64(p), n) }

func (m *image) getF32(p DevicePtr, n int) []float32 {
	b := m.get(p, 4*n)
	v := make([]float32, n)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

func (m *image) add(c Call, err error) {
	m.t.Helper()
	if err != nil {
		m.t.Fatal(err)
	}
	l := emutest.Launch{Kernel: c.Kernel, Grid: c.Grid, Block: c.Block, Shared: c.Shared}
	for _, a := range c.Args {
		l.Args = append(l.Args, emutest.Arg{Kind: a.Kind, V: a.V})
	}
	m.Add(l)
}

// run executes the queued calls in order and reads the memory back.
func (m *image) run(t *testing.T) {
	t.Helper()
	if err := m.runErr(t); err != nil {
		t.Fatal(err)
	}
}

func (m *image) runErr(t *testing.T) error {
	t.Helper()
	return m.Run(t)
}

func sameF32(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %v (%#x), CPU %v (%#x)", what, i, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
}

func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("%s: byte %d = %#02x, CPU %#02x (%d bytes)", what, i, got[i], want[i], len(want))
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range b {
		if a[i] != b[i] {
			return i
		}
	}
	return len(b)
}

func TestEmuQuantizeDequantize(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, c := range []struct{ n, bs, dtype int }{
		{1001, 64, DTypeF32}, {333, 256, DTypeF16}, {2000, 128, DTypeBF16}, {65, 32, DTypeF32}, {4097, 4096, DTypeF32},
	} {
		t.Run(fmt.Sprintf("n=%d bs=%d dtype=%d", c.n, c.bs, c.dtype), func(t *testing.T) {
			src := emutest.Weights(rng, c.n, c.bs)
			raw := emutest.F32LE(src)
			if c.dtype != DTypeF32 {
				h := make([]uint16, c.n)
				for i, v := range src {
					if c.dtype == DTypeBF16 {
						h[i] = half.F32ToBF16(v)
						src[i] = half.BF16ToF32(h[i])
					} else {
						h[i] = half.F32ToF16(v)
						src[i] = half.F16ToF32(h[i])
					}
				}
				raw = emutest.U16LE(h)
			}
			nb := nf4.Blocks(c.n, c.bs)
			wantP, wantA := make([]byte, nf4.PackedLen(c.n)), make([]float32, nb)
			nf4.Quantize(wantP, wantA, src, c.bs, nf4.QuantNF4)
			wantF := make([]byte, 4*c.n)
			nf4.DequantizeTo(wantF, nf4.Float32, wantP, wantA, &nf4.NF4, c.n, c.bs)
			wantH := make([]byte, 2*c.n)
			nf4.DequantizeTo(wantH, nf4.BFloat16, wantP, wantA, &nf4.NF4, c.n, c.bs)

			m := newImage(t)
			dSrc, dP, dA := m.put(raw), m.alloc(len(wantP)), m.alloc(4*nb)
			dF, dH := m.alloc(4*c.n), m.alloc(2*c.n)
			m.add(QuantizeCall(dSrc, c.dtype, c.n, c.bs, dP, dA))
			m.add(DequantizeCall(dP, dA, c.n, c.bs, dF, DTypeF32))
			m.add(DequantizeCall(dP, dA, c.n, c.bs, dH, DTypeBF16))
			m.run(t)
			sameBytes(t, "packed", m.get(dP, len(wantP)), wantP)
			sameF32(t, "absmax", m.getF32(dA, nb), wantA)
			sameBytes(t, "dequantized f32", m.get(dF, 4*c.n), wantF)
			sameBytes(t, "dequantized bf16", m.get(dH, 2*c.n), wantH)
		})
	}
}

func TestEmuNested(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	const nb = 256*2 + 45
	absmax := make([]float32, nb)
	for i := range absmax {
		absmax[i] = float32(math.Exp(rng.NormFloat64())) * 0.01
	}
	offset := nf4.Mean(absmax)
	for i := 256; i < 512; i++ {
		absmax[i] = offset // a nested block of zeros after the shift
	}
	wantQ, wantN := nf4.QuantizeNestedOffset(absmax, offset)
	dm := nf4.DynamicMap()
	wantD := make([]float32, nb)
	nf4.DequantizeNested(wantD, wantQ, wantN, &dm, offset, nf4.NestedBlocksize)

	m := newImage(t)
	dAbs, dMap := m.putF32(absmax), m.putF32(dm[:])
	dQ, dN, dD, dSum := m.alloc(nb), m.alloc(4*len(wantN)), m.alloc(4*nb), m.alloc(8)
	n := Nested{Q: dQ, Absmax: dN, Map: dMap, Offset: offset}
	m.add(NestedQuantizeCall(dAbs, nb, n))
	m.add(NestedDequantizeCall(n, nb, dD))
	m.add(SumCall(dAbs, nb, dSum))
	m.run(t)
	sameBytes(t, "nested codes", m.get(dQ, nb), wantQ)
	sameF32(t, "nested absmax", m.getF32(dN, len(wantN)), wantN)
	sameF32(t, "decoded absmax", m.getF32(dD, nb), wantD)
	var sum float64
	for _, a := range absmax {
		sum += float64(a)
	}
	if got := math.Float64frombits(binary.LittleEndian.Uint64(m.get(dSum, 8))); math.Abs(got-sum) > 1e-12*sum {
		t.Fatalf("absmax sum %v, want %v", got, sum)
	}
}

// fuseDTypes maps the kernels' dtype codes to the CPU codec's dtypes.
var fuseDTypes = map[int]nf4.DType{DTypeF32: nf4.Float32, DTypeBF16: nf4.BFloat16, DTypeF16: nf4.Float16}

// TestEmuFuse: both fused-merge kernels against the CPU's fused pass
// (shared/lora's NF4Codec: dequantize, round to the logical dtype as
// bitsandbytes' dequantize_4bit does, add DeltaRows, quantize), bit for bit,
// for fp32, bf16 and f16 logical dtypes; each case runs the plain entry
// point and the measuring one (_stats), which must give the same bytes and
// retention sums that agree with a float64 computation on the CPU.
func TestEmuFuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	telling, strided := 0, 0
	defer func() {
		if telling == 0 && !t.Failed() {
			t.Errorf("no case's merge changes with the delta's order: the cases cannot tell the FMA order from another")
		}
		if strided == 0 && !t.Failed() {
			t.Errorf("no case has enough tiles for the grid-stride variants")
		}
	}()
	for _, c := range []struct{ out, in, bs, rank, dtype int }{
		{37, 77, 64, 5, DTypeF32},     // 1-D, blocks across rows, a rank tail
		{100, 320, 64, 21, DTypeF32},  // 2-D, partial row and column tiles, two rank chunks
		{64, 256, 64, 16, DTypeF32},   // 2-D, one full tile
		{40, 96, 32, 7, DTypeF32},     // 2-D, 128-column tile over 96 columns
		{70, 16, 16, 9, DTypeF32},     // 2-D, 16-column tile: a warp spans two rows
		{300, 48, 16, 37, DTypeBF16},  // 2-D, 64-column tile over 48, three rank chunks
		{300, 96, 32, 7, DTypeF32},    // 2-D, 64- and 32-column tiles in turn (grid-stride: shapes alternate)
		{5000, 3, 64, 64, DTypeF32},   // 1-D, narrow rows shrink the tile
		{100, 1, 64, 4096, DTypeF32},  // 1-D, B too large for shared memory
		{130, 1000, 256, 9, DTypeF32}, // 1-D, In not a multiple of the blocksize
		{64, 256, 64, 16, DTypeBF16},  // 2-D, the Flux case
		{100, 320, 64, 21, DTypeBF16}, // 2-D, partial tiles
		{37, 77, 64, 5, DTypeBF16},    // 1-D, blocks across rows
		{64, 256, 64, 16, DTypeF16},
		{40, 96, 32, 7, DTypeF16},
		{37, 77, 64, 5, DTypeF16},
	} {
		dt := fuseDTypes[c.dtype]
		p, _ := PlanFuse(FuseShape{Out: c.out, In: c.in, Blocksize: c.bs, Rank: c.rank})
		t.Run(fmt.Sprintf("%dx%d bs=%d rank=%d %s %s", c.out, c.in, c.bs, c.rank, dt, p.Kernel), func(t *testing.T) {
			n := c.out * c.in
			nb := nf4.Blocks(n, c.bs)
			packed, absmax := make([]byte, nf4.PackedLen(n)), make([]float32, nb)
			nf4.Quantize(packed, absmax, emutest.Weights(rng, n, c.bs), c.bs, nf4.QuantNF4)
			a, b := make([]float32, c.rank*c.in), make([]float32, c.out*c.rank)
			for i := range a {
				a[i] = float32(rng.NormFloat64()) * 0.05
			}
			for i := range b {
				if rng.IntN(6) != 0 { // zero groups take the CPU's skip path
					b[i] = float32(rng.NormFloat64()) * 0.05
				}
			}
			// The CPU's fused pass: dequantize (rounded to the logical
			// dtype), DeltaRows, add, quantize.
			codec, err := lora.NewNF4Codec(nf4.QuantNF4, dt)
			if err != nil {
				t.Fatal(err)
			}
			delta := make([]float32, n)
			(&lora.SideLayer{Layer: lora.Layer{Out: c.out, In: c.in}, Rank: c.rank, A: a, B: b}).DeltaRows(delta, 0, c.out)
			mergeWith := func(delta []float32, round bool) ([]byte, []float32) {
				w := make([]float32, n)
				nf4.Dequantize(w, packed, absmax, &nf4.NF4, n, c.bs)
				if round {
					nf4.RoundTo(w, dt)
				}
				for i := range w {
					w[i] += delta[i]
				}
				p, a := make([]byte, len(packed)), make([]float32, nb)
				codec.Quantize(p, a, w, c.bs)
				return p, a
			}
			merge := func(round bool) ([]byte, []float32) { return mergeWith(delta, round) }
			wantP, wantA := merge(true)
			// The delta in the order before FMA (each product and sum
			// rounded): where its merge differs, the case tells the orders
			// apart (the absmax of a block is one merged weight, every bit).
			if p, a := mergeWith(deltaNoFMA(c.out, c.in, c.rank, a, b), true); !bytes.Equal(p, wantP) || !bytes.Equal(emutest.F32LE(a), emutest.F32LE(wantA)) {
				telling++
			}
			if c.dtype != DTypeF32 {
				// The case must tell the rounding apart, or it checks nothing.
				if p, a := merge(false); bytes.Equal(p, wantP) && bytes.Equal(emutest.F32LE(a), emutest.F32LE(wantA)) {
					t.Fatalf("%s rounding changes nothing here: pick other data", dt)
				}
			}

			// The retention sums as shared/lora measures them: the new weight
			// and the base, both rounded to the logical dtype.
			base, eff := make([]float32, n), make([]float32, n)
			codec.Dequantize(base, packed, absmax, c.bs)
			codec.Dequantize(eff, wantP, wantA, c.bs)
			var want [3]float64
			for i := range n {
				e, d := float64(eff[i])-float64(base[i]), float64(delta[i])
				want[0] += e * d
				want[1] += d * d
				want[2] += (e - d) * (e - d)
			}

			m := newImage(t)
			dA0, dB0 := m.putF32(a), m.putF32(b)
			dP, dA := m.put(packed), m.putF32(absmax)
			sP, sA := m.put(packed), m.putF32(absmax)
			stats := m.alloc(24)
			plain, err := FuseCall(FuseLayer{Packed: dP, Absmax: dA, Out: c.out, In: c.in, Blocksize: c.bs,
				A: dA0, B: dB0, Rank: c.rank, DType: c.dtype})
			if err != nil {
				t.Fatal(err)
			}
			measured, err := FuseCall(FuseLayer{Packed: sP, Absmax: sA, Out: c.out, In: c.in, Blocksize: c.bs,
				A: dA0, B: dB0, Rank: c.rank, DType: c.dtype, Stats: stats})
			if err != nil {
				t.Fatal(err)
			}
			if plain.Kernel != p.Kernel || measured.Kernel != p.Kernel+"_stats" {
				t.Fatalf("kernels %s and %s, want %s and its _stats variant", plain.Kernel, measured.Kernel, p.Kernel)
			}
			m.add(plain, nil)
			m.add(measured, nil)
			// The 2-D kernel at every tile width, with its staged codes and
			// with round 1's direct body, once with the codes at an odd
			// address (the staging's byte path), and on a grid of three
			// blocks, each striding over the tiles (a block stages a tile
			// right after writing back the previous one, whose shape may
			// differ, with only its barriers between), through the 16-byte
			// and the byte path: the same bytes each time.
			type variant struct {
				name   string
				p, a   DevicePtr
				cols   int
				direct bool
				grid   int
			}
			var variants []variant
			if p.TwoD() {
				for _, cols := range []int{16, 32, 64, 128, 256} {
					for _, direct := range []bool{false, true} {
						variants = append(variants, variant{fmt.Sprintf("tile_cols %d direct %v", cols, direct), m.put(packed), m.putF32(absmax), cols, direct, 0})
					}
				}
				odd := m.alloc(len(packed)+1) + 1
				copy(m.Mem[odd:], packed)
				variants = append(variants, variant{"codes at an odd address", odd, m.putF32(absmax), 0, false, 0},
					variant{"grid-stride", m.put(packed), m.putF32(absmax), 16, false, 3},
					variant{"grid-stride, 64 columns", m.put(packed), m.putF32(absmax), 64, false, 3},
					variant{"grid-stride, odd address", m.alloc(len(packed)+1) + 1, m.putF32(absmax), 64, false, 3})
				copy(m.Mem[variants[len(variants)-1].p:], packed)
			}
			ran := variants[:0]
			for _, v := range variants {
				call, err := FuseCall(FuseLayer{Packed: v.p, Absmax: v.a, Out: c.out, In: c.in, Blocksize: c.bs,
					A: dA0, B: dB0, Rank: c.rank, DType: c.dtype, TileCols: v.cols, Direct: v.direct})
				if v.grid > 0 {
					if call.Grid <= v.grid {
						continue // too few tiles to stride over; other cases have more
					}
					call.Grid = v.grid
					strided++
				}
				m.add(call, err)
				ran = append(ran, v)
			}
			m.run(t)
			sameBytes(t, "packed", m.get(dP, len(packed)), wantP)
			sameF32(t, "absmax", m.getF32(dA, nb), wantA)
			for _, v := range ran {
				sameBytes(t, "packed, "+v.name, m.get(v.p, len(packed)), wantP)
				sameF32(t, "absmax, "+v.name, m.getF32(v.a, nb), wantA)
			}
			sameBytes(t, "packed (stats)", m.get(sP, len(packed)), wantP)
			sameF32(t, "absmax (stats)", m.getF32(sA, nb), wantA)
			got := m.get(stats, 24)
			for k, name := range []string{"Σ eff·delta", "Σ delta²", "Σ (eff−delta)²"} {
				g := math.Float64frombits(binary.LittleEndian.Uint64(got[8*k:]))
				if math.Abs(g-want[k]) > 1e-9*math.Abs(want[k]) || (want[k] == 0) != (g == 0) {
					t.Errorf("%s = %.17g, want %.17g", name, g, want[k])
				}
			}
			if want[1] == 0 || want[0] <= 0 {
				t.Fatalf("sums %v: the case measures nothing", want)
			}
		})
	}
}

// TestEmuFuseArity: the emulator refuses a launch whose argument count is
// not the kernel's: a plain fused kernel given a stats pointer, a
// measuring one without it (cuLaunchKernel would misread either); and the
// Go side refuses to build such a call at all.
func TestEmuFuseArity(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stats bool
		edit  func(c *Call, stats DevicePtr)
		want  string
	}{
		{"2-D plain with stats", false, func(c *Call, s DevicePtr) { c.Args = append(c.Args, ptr(s)) }, "nf4_fuse2d takes 11 arguments, launch has 12"},
		{"2-D stats without", true, func(c *Call, _ DevicePtr) { c.Args = c.Args[:len(c.Args)-1] }, "nf4_fuse2d_stats takes 12 arguments, launch has 11"},
		{"1-D plain with stats", false, func(c *Call, s DevicePtr) {
			c.Kernel, c.Args = "nf4_fuse", append(c.Args[:8], num(4096), num(0), num(16), num(DTypeBF16), ptr(0), ptr(s))
		}, "nf4_fuse takes 13 arguments, launch has 14"},
		{"1-D stats without", true, func(c *Call, _ DevicePtr) {
			c.Kernel, c.Args = "nf4_fuse_stats", append(c.Args[:8], num(4096), num(0), num(16), num(DTypeBF16), ptr(0))
		}, "nf4_fuse_stats takes 14 arguments, launch has 13"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newImage(t)
			l := FuseLayer{Packed: m.alloc(64 * 256 / 2), Absmax: m.alloc(4 * 256), Out: 64, In: 256, Blocksize: 64,
				A: m.alloc(4 * 16 * 256), B: m.alloc(4 * 64 * 16), Rank: 16, DType: DTypeBF16}
			stats := m.alloc(24)
			if tc.stats {
				l.Stats = stats
			}
			c, err := FuseCall(l)
			if err != nil {
				t.Fatal(err)
			}
			tc.edit(&c, stats)
			if _, err := call(c.Kernel, c.Launch, c.Args...); err == nil || !strings.Contains(err.Error(), "arguments, want") {
				t.Errorf("call accepted %s with %d arguments: %v", c.Kernel, len(c.Args), err)
			}
			m.add(c, nil)
			if err := m.runErr(t); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("wrong arity not refused: %v, want %q", err, tc.want)
			}
		})
	}
}

func TestFuseCallDType(t *testing.T) {
	l := FuseLayer{Packed: 256, Absmax: 512, Out: 64, In: 256, Blocksize: 64, A: 1024, B: 2048, Rank: 16}
	for _, tc := range []struct {
		out, in, dtype int
		stats          DevicePtr
		kernel         string
		err            string
	}{
		{64, 256, DTypeBF16, 4096, "nf4_fuse2d_stats", ""},
		{37, 77, DTypeF16, 4096, "nf4_fuse_stats", ""},
		{64, 256, DTypeF32, 4096, "nf4_fuse2d_stats", ""},
		{64, 256, DTypeBF16, 0, "nf4_fuse2d", ""},
		{37, 77, DTypeF16, 0, "nf4_fuse", ""},
		{64, 256, 3, 4096, "", "fuse: dtype 3"},
		{37, 77, -1, 0, "", "fuse: dtype -1"},
	} {
		l.Out, l.In, l.DType, l.Stats = tc.out, tc.in, tc.dtype, tc.stats
		c, err := FuseCall(l)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("dtype %d: error %v, want %q", tc.dtype, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		last := []Arg{num(tc.dtype), ptr(0)}
		if tc.stats != 0 {
			last = append(last, ptr(tc.stats))
		}
		if c.Kernel != tc.kernel || len(c.Args) != Entries[tc.kernel] || !slices.Equal(c.Args[len(c.Args)-len(last):], last) {
			t.Errorf("%dx%d dtype %d stats %#x: %s with last arguments %v of %d", tc.out, tc.in, tc.dtype, tc.stats, c.Kernel, c.Args[len(c.Args)-len(last):], len(c.Args))
		}
	}
}

func TestEmuSide(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	const out, in, r, rank, col = 33, 29, 16, 48, 16
	const scale = float32(0.75 * 1.25)
	bs, as := make([]uint16, out*r), make([]uint16, r*in)
	for i := range bs {
		bs[i] = half.F32ToBF16(float32(rng.NormFloat64()))
	}
	for i := range as {
		as[i] = half.F32ToBF16(float32(rng.NormFloat64()))
	}
	m := newImage(t)
	dB, dA := m.put(emutest.U16LE(bs)), m.put(emutest.U16LE(as))
	dBcat, dAcat := m.alloc(4*out*rank), m.alloc(4*rank*in)
	m.add(SideColsCall(dB, DTypeBF16, 3, out-3, r, scale, dBcat, 3, rank, col))
	m.add(SideRowsCall(dA, DTypeBF16, r*in, scale, dAcat+DevicePtr(4*col*in)))
	m.run(t)
	wantB, wantA := make([]float32, out*rank), make([]float32, rank*in)
	for i := 3; i < out; i++ {
		for j := 0; j < r; j++ {
			wantB[i*rank+col+j] = half.BF16ToF32(bs[i*r+j]) * scale
		}
	}
	for i := range as {
		wantA[col*in+i] = half.BF16ToF32(as[i]) * scale
	}
	sameF32(t, "B_cat", m.getF32(dBcat, out*rank), wantB)
	sameF32(t, "A_cat", m.getF32(dAcat, rank*in), wantA)
	if _, err := SideColsCall(dB, DTypeBF16, 0, out, r, 1, dBcat, 0, rank, 40); err == nil {
		t.Fatal("columns past the rank accepted")
	}
}

// TestEmuSharedGuard: the emulator catches a launch whose plan gives the
// kernel less shared memory than it uses, so the plans above are checked.
func TestEmuSharedGuard(t *testing.T) {
	m := newImage(t)
	c, err := FuseCall(FuseLayer{Packed: m.alloc(64 * 256 / 2), Absmax: m.alloc(4 * 256), Out: 64, In: 256, Blocksize: 64,
		A: m.alloc(4 * 16 * 256), B: m.alloc(4 * 64 * 16), Rank: 16})
	if err != nil {
		t.Fatal(err)
	}
	c.Shared -= 64 // the staged codes' last 64 bytes
	m.add(c, nil)
	if err := m.runErr(t); err == nil || !strings.Contains(err.Error(), "past its") {
		t.Fatalf("short shared memory not caught: %v", err)
	}
}

// TestEmuFuseNonFinite: a merge that a huge strength or LoRA values near
// the float limits make non-finite sets the layer's flag word as the CPU's
// fused pass (shared/lora) refuses it: FuseBadMerged when base + delta is
// NaN or ±Inf in fp32 (the CPU's first check), FuseBadRequant when the
// merge is finite but the re-quantized weight, rounded to the logical
// dtype, is not (its last check); a merge the CPU accepts sets nothing.
// Both kernels, plain and measuring.
func TestEmuFuseNonFinite(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	for _, c := range []struct {
		name                  string
		out, in, bs, rank, dt int
		v                     float32 // B[row, 0]; A's rank-0 row is 100
	}{
		{"2-D bf16 LoRA values 3e38", 64, 256, 64, 16, DTypeBF16, 3e38},
		{"1-D bf16 LoRA values 3e38", 37, 77, 64, 5, DTypeBF16, 3e38},
		{"2-D f32 strength 1e308 folded (fp32 Inf)", 64, 256, 64, 16, DTypeF32, float32(math.Inf(1))},
		{"2-D f16 past float16", 40, 96, 32, 7, DTypeF16, 1e7},
		{"1-D f16 past float16", 37, 77, 64, 5, DTypeF16, 1e7},
		{"2-D bf16 large but finite", 64, 256, 64, 16, DTypeBF16, 1e30},
		{"1-D f32 large but finite", 37, 77, 64, 5, DTypeF32, 1e30},
	} {
		t.Run(c.name, func(t *testing.T) {
			dt := fuseDTypes[c.dt]
			n := c.out * c.in
			nb := nf4.Blocks(n, c.bs)
			packed, absmax := make([]byte, nf4.PackedLen(n)), make([]float32, nb)
			nf4.Quantize(packed, absmax, emutest.Weights(rng, n, c.bs), c.bs, nf4.QuantNF4)
			a, b := make([]float32, c.rank*c.in), make([]float32, c.out*c.rank)
			for i := range a {
				a[i] = float32(rng.NormFloat64()) * 0.05
			}
			for i := range b {
				b[i] = float32(rng.NormFloat64()) * 0.05
			}
			row := c.out / 2
			for k := range c.rank {
				b[row*c.rank+k] = 0
			}
			b[row*c.rank] = c.v
			for i := range c.in {
				a[i] = 100
			}
			// The CPU's decision, as shared/lora's fused pass makes it.
			codec, err := lora.NewNF4Codec(nf4.QuantNF4, dt)
			if err != nil {
				t.Fatal(err)
			}
			w, delta := make([]float32, n), make([]float32, n)
			codec.Dequantize(w, packed, absmax, c.bs)
			(&lora.SideLayer{Layer: lora.Layer{Out: c.out, In: c.in}, Rank: c.rank, A: a, B: b}).DeltaRows(delta, 0, c.out)
			var want uint32
			for i := range w {
				w[i] += delta[i]
				if nonFinite(w[i]) {
					want = FuseBadMerged | FuseBadRequant // an infinite absmax too
				}
			}
			if want == 0 {
				p, am := make([]byte, len(packed)), make([]float32, nb)
				codec.Quantize(p, am, w, c.bs)
				codec.Dequantize(w, p, am, c.bs)
				if slices.ContainsFunc(w, nonFinite) {
					want = FuseBadRequant
				}
			}
			m := newImage(t)
			dA0, dB0 := m.putF32(a), m.putF32(b)
			var flags []DevicePtr
			for _, stats := range []bool{false, true} {
				l := FuseLayer{Packed: m.put(packed), Absmax: m.putF32(absmax), Out: c.out, In: c.in, Blocksize: c.bs,
					A: dA0, B: dB0, Rank: c.rank, DType: c.dt, Flags: m.alloc(4)}
				if stats {
					l.Stats = m.alloc(24)
				}
				flags = append(flags, l.Flags)
				m.add(FuseCall(l))
			}
			m.run(t)
			for i, f := range flags {
				got := binary.LittleEndian.Uint32(m.get(f, 4))
				if got != want {
					t.Errorf("stats=%v: flags %#x (%s), CPU %#x (%s)", i == 1, got, FuseFlagsError(got), want, FuseFlagsError(want))
				}
			}
			if c.v > 1e30 && c.dt != DTypeF32 && want == 0 {
				t.Fatal("the poisoned case is finite: it checks nothing")
			}
		})
	}
}

func nonFinite(v float32) bool { return math.Float32bits(v)&0x7f800000 == 0x7f800000 }

// deltaNoFMA is B·A in the delta product's order before it used FMA (per
// element, ((b0·a0 + b1·a1) + b2·a2) + b3·a3 per group of four ranks, then
// each rank past the groups, every product and sum rounded on its own):
// TestEmuFuse holds its cases to telling that order from the kernels'.
func deltaNoFMA(out, in, rank int, a, b []float32) []float32 {
	d := make([]float32, out*in)
	for r := range out {
		brow := b[r*rank : (r+1)*rank]
		for j := range in {
			var acc float32
			k := 0
			for ; k+4 <= rank; k += 4 {
				if brow[k] == 0 && brow[k+1] == 0 && brow[k+2] == 0 && brow[k+3] == 0 {
					continue
				}
				s := float32(brow[k]*a[k*in+j]) + float32(brow[k+1]*a[(k+1)*in+j])
				s = float32(s) + float32(brow[k+2]*a[(k+2)*in+j])
				s = float32(s) + float32(brow[k+3]*a[(k+3)*in+j])
				acc = float32(acc + s)
			}
			for ; k < rank; k++ {
				if brow[k] != 0 {
					acc = float32(acc + float32(brow[k]*a[k*in+j]))
				}
			}
			d[r*in+j] = acc
		}
	}
	return d
}
