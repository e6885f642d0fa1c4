//go:build linux

package gpusim

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/gpu/internal/emutest"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
)

// mem is device memory a scenario runs on: the simulator, or the kernel
// emulator's image (kernels.cu itself, compiled for the CPU).
type mem interface {
	alloc(n int) gpu.DevicePtr
	put(b []byte) gpu.DevicePtr
	launch(c gpu.Call, err error)
	run() error
	get(p gpu.DevicePtr, n int) []byte
}

type simMem struct {
	t    *testing.T
	d    *Device
	slab bool // allocate slabs (else scratch), alternating
}

func newSim(t *testing.T) *simMem { return &simMem{t: t, d: newDevice(t)} }

func (m *simMem) alloc(n int) gpu.DevicePtr {
	m.t.Helper()
	m.slab = !m.slab
	if m.slab {
		return alloc(m.t, m.d, uint64(n)).Ptr
	}
	p, err := m.d.MemAlloc(uint64(n))
	if err != nil {
		m.t.Fatal(err)
	}
	// Scratch is not promised zeroed; the tests rely on no initial bytes.
	return p
}

func (m *simMem) put(b []byte) gpu.DevicePtr {
	p := m.alloc(len(b))
	upload(m.t, m.d, p, b)
	return p
}

func (m *simMem) launch(c gpu.Call, err error) {
	m.t.Helper()
	if err == nil {
		err = m.d.Launch(c)
	}
	if err != nil {
		m.t.Fatal(err)
	}
}

func (m *simMem) run() error { return m.d.Sync() }

func (m *simMem) get(p gpu.DevicePtr, n int) []byte { return download(m.t, m.d, p, n) }

type emuMem struct {
	t *testing.T
	*emutest.Image
}

func newEmu(t *testing.T) *emuMem {
	emutest.Emulator(t) // skips without g++
	return &emuMem{t: t, Image: emutest.NewImage()}
}

func (m *emuMem) alloc(n int) gpu.DevicePtr         { return gpu.DevicePtr(m.Alloc(n)) }
func (m *emuMem) put(b []byte) gpu.DevicePtr        { return gpu.DevicePtr(m.Put(b)) }
func (m *emuMem) get(p gpu.DevicePtr, n int) []byte { return bytes.Clone(m.Get(uint64(p), n)) }
func (m *emuMem) run() error                        { return m.Run(m.t) }
func (m *emuMem) launch(c gpu.Call, err error) {
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

// out is one result buffer of a scenario.
type out struct {
	name string
	p    gpu.DevicePtr
	n    int
}

func read(t *testing.T, m mem, outs []out) map[string][]byte {
	t.Helper()
	if err := m.run(); err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	for _, o := range outs {
		got[o.name] = m.get(o.p, o.n)
	}
	return got
}

func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%s: byte %d = %#02x, want %#02x (%d bytes)", what, i, got[i], want[i], len(want))
		}
	}
}

var dtypeNames = map[int]nf4.DType{gpu.DTypeF32: nf4.Float32, gpu.DTypeBF16: nf4.BFloat16, gpu.DTypeF16: nf4.Float16}

// quantCase: src of dtype quantized, then dequantized to f32, bf16, f16.
type quantCase struct{ n, bs, dtype int }

func (c quantCase) inputs(rng *rand.Rand) (raw []byte, src []float32) {
	src = emutest.Weights(rng, c.n, c.bs)
	raw = emutest.F32LE(src)
	if c.dtype != gpu.DTypeF32 {
		h := make([]uint16, c.n)
		for i, v := range src {
			if c.dtype == gpu.DTypeBF16 {
				h[i] = half.F32ToBF16(v)
				src[i] = half.BF16ToF32(h[i])
			} else {
				h[i] = half.F32ToF16(v)
				src[i] = half.F16ToF32(h[i])
			}
		}
		raw = emutest.U16LE(h)
	}
	return raw, src
}

func (c quantCase) scenario(m mem, raw []byte) []out {
	nb := nf4.Blocks(c.n, c.bs)
	dSrc, dP, dA := m.put(raw), m.alloc(nf4.PackedLen(c.n)), m.alloc(4*nb)
	dF, dB, dH := m.alloc(4*c.n), m.alloc(2*c.n), m.alloc(2*c.n)
	m.launch(gpu.QuantizeCall(dSrc, c.dtype, c.n, c.bs, dP, dA))
	m.launch(gpu.DequantizeCall(dP, dA, c.n, c.bs, dF, gpu.DTypeF32))
	m.launch(gpu.DequantizeCall(dP, dA, c.n, c.bs, dB, gpu.DTypeBF16))
	m.launch(gpu.DequantizeCall(dP, dA, c.n, c.bs, dH, gpu.DTypeF16))
	return []out{{"packed", dP, nf4.PackedLen(c.n)}, {"absmax", dA, 4 * nb}, {"f32", dF, 4 * c.n}, {"bf16", dB, 2 * c.n}, {"f16", dH, 2 * c.n}}
}

func (c quantCase) want(src []float32) map[string][]byte {
	nb := nf4.Blocks(c.n, c.bs)
	p, a := make([]byte, nf4.PackedLen(c.n)), make([]float32, nb)
	nf4.Quantize(p, a, src, c.bs, nf4.QuantNF4)
	w := map[string][]byte{"packed": p, "absmax": emutest.F32LE(a)}
	for name, dt := range map[string]nf4.DType{"f32": nf4.Float32, "bf16": nf4.BFloat16, "f16": nf4.Float16} {
		b := make([]byte, c.n*dt.Size())
		nf4.DequantizeTo(b, dt, p, a, &nf4.NF4, c.n, c.bs)
		w[name] = b
	}
	return w
}

var quantCases = []quantCase{ // emu_test's shapes, and more
	{1001, 64, gpu.DTypeF32}, {333, 256, gpu.DTypeF16}, {2000, 128, gpu.DTypeBF16}, {65, 32, gpu.DTypeF32},
	{4097, 4096, gpu.DTypeF32}, {1, 64, gpu.DTypeBF16}, {77, 2, gpu.DTypeF16},
}

func TestQuantizeDequantize(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, c := range quantCases {
		t.Run(fmt.Sprintf("n=%d bs=%d %s", c.n, c.bs, dtypeNames[c.dtype]), func(t *testing.T) {
			raw, src := c.inputs(rng)
			m := newSim(t)
			got := read(t, m, c.scenario(m, raw))
			for name, w := range c.want(src) {
				sameBytes(t, name, got[name], w)
			}
		})
	}
}

// nestedCase: nested (double) quantization of absmax with a block that is
// all zeros after the shift, decoded again, and the absmax sum.
type nestedCase struct {
	nb     int
	custom bool // a map other than bitsandbytes' dynamic map
}

func (c nestedCase) inputs(rng *rand.Rand) (absmax []float32, offset float32, code [256]float32) {
	absmax = make([]float32, c.nb)
	for i := range absmax {
		absmax[i] = float32(math.Exp(rng.NormFloat64())) * 0.01
	}
	offset = nf4.Mean(absmax)
	for i := 256; i < min(512, c.nb); i++ {
		absmax[i] = offset
	}
	code = nf4.DynamicMap()
	if c.custom {
		for i := range code { // sorted, uneven, not symmetric
			x := float32(i-128) / 128
			code[i] = x * x * x * 0.9
		}
	}
	return absmax, offset, code
}

func (c nestedCase) scenario(m mem, absmax []float32, offset float32, code [256]float32) []out {
	nc := nf4.Blocks(c.nb, nf4.NestedBlocksize)
	dAbs, dMap := m.put(emutest.F32LE(absmax)), m.put(emutest.F32LE(code[:]))
	dQ, dN, dD, dSum := m.alloc(c.nb), m.alloc(4*nc), m.alloc(4*c.nb), m.put(emutest.F32LE([]float32{0, 0}))
	n := gpu.Nested{Q: dQ, Absmax: dN, Map: dMap, Offset: offset}
	m.launch(gpu.NestedQuantizeCall(dAbs, c.nb, n))
	m.launch(gpu.NestedDequantizeCall(n, c.nb, dD))
	m.launch(gpu.SumCall(dAbs, c.nb, dSum))
	return []out{{"q", dQ, c.nb}, {"nabs", dN, 4 * nc}, {"decoded", dD, 4 * c.nb}, {"sum", dSum, 8}}
}

func TestNested(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, c := range []nestedCase{{256*2 + 45, false}, {1, false}, {256, false}, {700, true}} {
		t.Run(fmt.Sprintf("nb=%d custom=%v", c.nb, c.custom), func(t *testing.T) {
			absmax, offset, code := c.inputs(rng)
			m := newSim(t)
			got := read(t, m, c.scenario(m, absmax, offset, code))
			var wantQ []byte
			var wantN []float32
			if c.custom {
				wantQ, wantN = nestedQuantize(absmax, offset, &code)
			} else {
				wantQ, wantN = nf4.QuantizeNestedOffset(absmax, offset)
			}
			wantD := make([]float32, c.nb)
			nf4.DequantizeNested(wantD, wantQ, wantN, &code, offset, nf4.NestedBlocksize)
			sameBytes(t, "q", got["q"], wantQ)
			sameBytes(t, "nabs", got["nabs"], emutest.F32LE(wantN))
			sameBytes(t, "decoded", got["decoded"], emutest.F32LE(wantD))
			var sum float64
			for _, a := range absmax {
				sum += float64(a)
			}
			if s := math.Float64frombits(binary.LittleEndian.Uint64(got["sum"])); math.Abs(s-sum) > 1e-12*sum {
				t.Fatalf("absmax sum %v, want %v", s, sum)
			}
		})
	}
}

// TestDynamicCodePort: the simulator's port of kernels.cu's dynamic_code
// equals shared/nf4's nested quantization on the dynamic map, so the
// custom-map path is the same rule.
func TestDynamicCodePort(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	absmax := make([]float32, 3000)
	for i := range absmax {
		absmax[i] = float32(math.Exp(rng.NormFloat64())) * 0.01
	}
	off := nf4.Mean(absmax)
	for i := 512; i < 768; i++ {
		absmax[i] = off
	}
	code := nf4.DynamicMap()
	q, nabs := nestedQuantize(absmax, off, &code)
	wq, wn := nf4.QuantizeNestedOffset(absmax, off)
	sameBytes(t, "q", q, wq)
	sameBytes(t, "nabs", emutest.F32LE(nabs), emutest.F32LE(wn))
}

// nestedQuantize is the test's port of kernels.cu's nested_quantize over
// any sorted map, by the plain binary search (nf4.QuantizeNestedInto, which
// the simulator runs, takes a bucket table on the dynamic map). Explicit float32 conversions keep
// every product and sum rounded on its own, as __fmul_rn/__fadd_rn do.
func nestedQuantize(absmax []float32, off float32, code *[256]float32) ([]byte, []float32) {
	q := make([]byte, len(absmax))
	nabs := make([]float32, nf4.Blocks(len(absmax), gpu.NestedBlocksize))
	s := make([]float32, gpu.NestedBlocksize)
	for c := range nabs {
		lo, hi := c*gpu.NestedBlocksize, min((c+1)*gpu.NestedBlocksize, len(absmax))
		var am float32
		for i, v := range absmax[lo:hi] {
			s[i] = float32(v + -off)
			if x := float32(math.Abs(float64(s[i]))); x > am {
				am = x
			}
		}
		nabs[c] = am
		inv := float32(1 / am)
		for i := range hi - lo {
			q[lo+i] = nf4.QuantizeDynamic(code, float32(s[i]*inv))
		}
	}
	return q, nabs
}

// fuseCase is one fused merge: emu_test's shapes and dtypes.
type fuseCase struct{ out, in, bs, rank, dtype int }

var fuseCases = []fuseCase{
	{37, 77, 64, 5, gpu.DTypeF32},     // 1-D, blocks across rows, a rank tail
	{100, 320, 64, 21, gpu.DTypeF32},  // 2-D, partial row and column tiles, two rank chunks
	{64, 256, 64, 16, gpu.DTypeF32},   // 2-D, one full tile
	{40, 96, 32, 7, gpu.DTypeF32},     // 2-D, 128-column tile over 96 columns
	{5000, 3, 64, 64, gpu.DTypeF32},   // 1-D, narrow rows shrink the tile
	{100, 1, 64, 4096, gpu.DTypeF32},  // 1-D, B too large for shared memory
	{130, 1000, 256, 9, gpu.DTypeF32}, // 1-D, In not a multiple of the blocksize
	{64, 256, 64, 16, gpu.DTypeBF16},  // 2-D, the Flux case
	{100, 320, 64, 21, gpu.DTypeBF16}, // 2-D, partial tiles
	{37, 77, 64, 5, gpu.DTypeBF16},    // 1-D, blocks across rows
	{64, 256, 64, 16, gpu.DTypeF16},
	{40, 96, 32, 7, gpu.DTypeF16},
	{37, 77, 64, 5, gpu.DTypeF16},
	{300, 700, 64, 3, gpu.DTypeBF16}, // 1-D over several simulator chunks
	{5000, 3, 64, 68, gpu.DTypeBF16}, // 1-D, the plain and _stats plans differ (tile 512, 256)
}

func (c fuseCase) inputs(rng *rand.Rand) (packed []byte, absmax, a, b []float32) {
	n := c.out * c.in
	packed, absmax = make([]byte, nf4.PackedLen(n)), make([]float32, nf4.Blocks(n, c.bs))
	nf4.Quantize(packed, absmax, emutest.Weights(rng, n, c.bs), c.bs, nf4.QuantNF4)
	a, b = make([]float32, c.rank*c.in), make([]float32, c.out*c.rank)
	for i := range a {
		a[i] = float32(rng.NormFloat64()) * 0.05
	}
	for i := range b {
		if rng.IntN(6) != 0 { // zero groups take the skip path
			b[i] = float32(rng.NormFloat64()) * 0.05
		}
	}
	return packed, absmax, a, b
}

// scenario fuses the layer twice, without and with the retention sums
// ("stats": 3 float64): the plain entry point and the _stats one, each
// with its non-finite flag word ("flags", "flags (stats)").
func (c fuseCase) scenario(m mem, packed []byte, absmax, a, b []float32) []out {
	dA0, dB0 := m.put(emutest.F32LE(a)), m.put(emutest.F32LE(b))
	dP, dA, fl := m.put(packed), m.put(emutest.F32LE(absmax)), m.put(make([]byte, 4))
	sP, sA, st, sfl := m.put(packed), m.put(emutest.F32LE(absmax)), m.put(make([]byte, 24)), m.put(make([]byte, 4))
	m.launch(gpu.FuseCall(gpu.FuseLayer{Packed: dP, Absmax: dA, Out: c.out, In: c.in, Blocksize: c.bs,
		A: dA0, B: dB0, Rank: c.rank, DType: c.dtype, Flags: fl}))
	m.launch(gpu.FuseCall(gpu.FuseLayer{Packed: sP, Absmax: sA, Out: c.out, In: c.in, Blocksize: c.bs,
		A: dA0, B: dB0, Rank: c.rank, DType: c.dtype, Flags: sfl, Stats: st}))
	return []out{{"packed", dP, len(packed)}, {"absmax", dA, 4 * len(absmax)}, {"flags", fl, 4},
		{"packed (stats)", sP, len(packed)}, {"absmax (stats)", sA, 4 * len(absmax)}, {"flags (stats)", sfl, 4}, {"stats", st, 24}}
}

// poison makes a case's factors overflow: B[row, 0] = v and A's rank-0
// row 100, so the merged weights of that row are v·100: ±Inf for v = 3e38,
// or, for v = 1e7, finite in fp32 but past float16's range once
// re-quantized.
func poison(a, b []float32, rank, row int, v float32) {
	for k := range rank {
		b[row*rank+k] = 0
	}
	b[row*rank] = v
	in := len(a) / rank
	for c := range in {
		a[c] = 100
	}
}

// wantStats is the retention sums of a fused merge in float64 on the CPU:
// Σ eff·delta, Σ delta², Σ (eff − delta)², eff the fused weight minus the
// original, both dequantized and rounded to the logical dtype.
func (c fuseCase) wantStats(packed []byte, absmax, a, b []float32, fused map[string][]byte) [3]float64 {
	n := c.out * c.in
	base, eff := make([]float32, n), make([]float32, n)
	nf4.Dequantize(base, packed, absmax, &nf4.NF4, n, c.bs)
	nf4.Dequantize(eff, fused["packed"], f32s(fused["absmax"]), &nf4.NF4, n, c.bs)
	nf4.RoundTo(base, dtypeNames[c.dtype])
	nf4.RoundTo(eff, dtypeNames[c.dtype])
	delta := make([]float32, n)
	(&lora.SideLayer{Layer: lora.Layer{Out: c.out, In: c.in}, Rank: c.rank, A: a, B: b}).DeltaRows(delta, 0, c.out)
	var s [3]float64
	for i := range n {
		e, d := float64(eff[i])-float64(base[i]), float64(delta[i])
		s[0] += e * d
		s[1] += d * d
		s[2] += (e - d) * (e - d)
	}
	return s
}

// sameStats compares retention sums to 1e-9 relative (the order differs).
func sameStats(t *testing.T, what string, got []byte, want [3]float64) {
	t.Helper()
	for k := range want {
		g := math.Float64frombits(binary.LittleEndian.Uint64(got[8*k:]))
		if math.Abs(g-want[k]) > 1e-9*math.Abs(want[k]) || (g == 0) != (want[k] == 0) {
			t.Errorf("%s[%d] = %.17g, want %.17g", what, k, g, want[k])
		}
	}
}

func statsOf(b []byte) [3]float64 {
	var s [3]float64
	for k := range s {
		s[k] = math.Float64frombits(binary.LittleEndian.Uint64(b[8*k:]))
	}
	return s
}

// want is the CPU's fused pass over the whole layer at once.
func (c fuseCase) want(t *testing.T, packed []byte, absmax, a, b []float32, round bool) map[string][]byte {
	n := c.out * c.in
	w := make([]float32, n)
	nf4.Dequantize(w, packed, absmax, &nf4.NF4, n, c.bs)
	if round {
		nf4.RoundTo(w, dtypeNames[c.dtype])
	}
	delta := make([]float32, n)
	(&lora.SideLayer{Layer: lora.Layer{Out: c.out, In: c.in}, Rank: c.rank, A: a, B: b}).DeltaRows(delta, 0, c.out)
	for i := range w {
		w[i] += delta[i]
	}
	p, am := make([]byte, len(packed)), make([]float32, len(absmax))
	nf4.Quantize(p, am, w, c.bs, nf4.QuantNF4)
	return map[string][]byte{"packed": p, "absmax": emutest.F32LE(am)}
}

func (c fuseCase) String() string {
	p, _ := gpu.PlanFuse(gpu.FuseShape{Out: c.out, In: c.in, Blocksize: c.bs, Rank: c.rank})
	return fmt.Sprintf("%dx%d bs=%d rank=%d %s %s", c.out, c.in, c.bs, c.rank, dtypeNames[c.dtype], p.Kernel)
}

func TestFuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, c := range fuseCases {
		t.Run(c.String(), func(t *testing.T) {
			packed, absmax, a, b := c.inputs(rng)
			m := newSim(t)
			got := read(t, m, c.scenario(m, packed, absmax, a, b))
			want := c.want(t, packed, absmax, a, b, true)
			sameBytes(t, "packed", got["packed"], want["packed"])
			sameBytes(t, "absmax", got["absmax"], want["absmax"])
			sameBytes(t, "packed (stats)", got["packed (stats)"], want["packed"])
			sameBytes(t, "absmax (stats)", got["absmax (stats)"], want["absmax"])
			sameBytes(t, "flags", got["flags"], []byte{0, 0, 0, 0})
			sameBytes(t, "flags (stats)", got["flags (stats)"], []byte{0, 0, 0, 0})
			ws := c.wantStats(packed, absmax, a, b, want)
			if ws[1] == 0 || ws[0] <= 0 {
				t.Fatalf("sums %v: the case measures nothing", ws)
			}
			sameStats(t, "stats", got["stats"], ws)
			if c.dtype != gpu.DTypeF32 {
				unrounded := c.want(t, packed, absmax, a, b, false)
				if bytes.Equal(unrounded["packed"], want["packed"]) && bytes.Equal(unrounded["absmax"], want["absmax"]) {
					t.Fatalf("rounding to %s changes nothing here: the case checks nothing", dtypeNames[c.dtype])
				}
			}
		})
	}
}

// sideScenario: emu_test's side-factor build, B columns and A rows.
const sideOut, sideIn, sideR, sideRank, sideCol = 33, 29, 16, 48, 16

const sideScale = float32(0.75 * 1.25)

func sideInputs(rng *rand.Rand, dtype int) (b, a []byte, bf, af []float32) {
	bf, af = make([]float32, sideOut*sideR), make([]float32, sideR*sideIn)
	enc := func(v []float32) []byte {
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		switch dtype {
		case gpu.DTypeBF16:
			h := make([]uint16, len(v))
			for i := range v {
				h[i] = half.F32ToBF16(v[i])
				v[i] = half.BF16ToF32(h[i])
			}
			return emutest.U16LE(h)
		case gpu.DTypeF16:
			h := make([]uint16, len(v))
			for i := range v {
				h[i] = half.F32ToF16(v[i])
				v[i] = half.F16ToF32(h[i])
			}
			return emutest.U16LE(h)
		}
		return emutest.F32LE(v)
	}
	return enc(bf), enc(af), bf, af
}

func sideScenario(m mem, dtype int, b, a []byte) []out {
	dB, dA := m.put(b), m.put(a)
	dBcat, dAcat := m.put(make([]byte, 4*sideOut*sideRank)), m.put(make([]byte, 4*sideRank*sideIn))
	m.launch(gpu.SideColsCall(dB, dtype, 3, sideOut-3, sideR, sideScale, dBcat, 3, sideRank, sideCol))
	m.launch(gpu.SideRowsCall(dA, dtype, sideR*sideIn, sideScale, dAcat+gpu.DevicePtr(4*sideCol*sideIn)))
	return []out{{"B_cat", dBcat, 4 * sideOut * sideRank}, {"A_cat", dAcat, 4 * sideRank * sideIn}}
}

func TestSide(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, dtype := range []int{gpu.DTypeBF16, gpu.DTypeF16, gpu.DTypeF32} {
		t.Run(string(dtypeNames[dtype]), func(t *testing.T) {
			b, a, bf, af := sideInputs(rng, dtype)
			m := newSim(t)
			got := read(t, m, sideScenario(m, dtype, b, a))
			wantB, wantA := make([]float32, sideOut*sideRank), make([]float32, sideRank*sideIn)
			for i := 3; i < sideOut; i++ {
				for j := range sideR {
					wantB[i*sideRank+sideCol+j] = bf[i*sideR+j] * sideScale
				}
			}
			for i, v := range af {
				wantA[sideCol*sideIn+i] = v * sideScale
			}
			sameBytes(t, "B_cat", got["B_cat"], emutest.F32LE(wantB))
			sameBytes(t, "A_cat", got["A_cat"], emutest.F32LE(wantA))
		})
	}
}

// TestAgainstEmulator runs the same scenarios through kernels.cu on the
// CPU (the kernel emulator) and through the simulator: every output byte
// must agree (the absmax sum to 1e-12, as its order differs).
func TestAgainstEmulator(t *testing.T) {
	emu := newEmu(t)
	sim := newSim(t)
	rng := rand.New(rand.NewPCG(21, 22))
	type pair struct{ sim, emu []out }
	var all []pair
	type flagCheck struct {
		name string
		outs []out
		want byte
	}
	var flagChecks []flagCheck
	for _, c := range []quantCase{{1001, 64, gpu.DTypeF32}, {333, 256, gpu.DTypeF16}, {2000, 128, gpu.DTypeBF16}} {
		raw, _ := c.inputs(rng)
		all = append(all, pair{c.scenario(sim, raw), c.scenario(emu, raw)})
	}
	for _, c := range []nestedCase{{256*2 + 45, false}, {700, true}} {
		absmax, offset, code := c.inputs(rng)
		all = append(all, pair{c.scenario(sim, absmax, offset, code), c.scenario(emu, absmax, offset, code)})
	}
	for _, c := range []fuseCase{
		{37, 77, 64, 5, gpu.DTypeBF16}, {100, 320, 64, 21, gpu.DTypeBF16}, {40, 96, 32, 7, gpu.DTypeF16}, {13, 1000, 256, 9, gpu.DTypeF32},
	} {
		packed, absmax, a, b := c.inputs(rng)
		all = append(all, pair{c.scenario(sim, packed, absmax, a, b), c.scenario(emu, packed, absmax, a, b)})
	}
	// Non-finite merges: the flag words (and bytes) of both must agree.
	for _, c := range []struct {
		fuseCase
		v    float32
		want byte
	}{
		{fuseCase{64, 256, 64, 16, gpu.DTypeBF16}, 3e38, gpu.FuseBadMerged | gpu.FuseBadRequant},
		{fuseCase{37, 77, 64, 5, gpu.DTypeBF16}, 3e38, gpu.FuseBadMerged | gpu.FuseBadRequant},
		{fuseCase{40, 96, 32, 7, gpu.DTypeF16}, 1e7, gpu.FuseBadRequant},
		{fuseCase{37, 77, 64, 5, gpu.DTypeF16}, 1e7, gpu.FuseBadRequant},
	} {
		packed, absmax, a, b := c.inputs(rng)
		poison(a, b, c.rank, c.out/2, c.v)
		sc, ec := c.scenario(sim, packed, absmax, a, b), c.scenario(emu, packed, absmax, a, b)
		all = append(all, pair{sc, ec})
		flagChecks = append(flagChecks, flagCheck{c.String(), sc, c.want})
	}
	for _, dtype := range []int{gpu.DTypeBF16, gpu.DTypeF16} {
		b, a, _, _ := sideInputs(rng, dtype)
		all = append(all, pair{sideScenario(sim, dtype, b, a), sideScenario(emu, dtype, b, a)})
	}
	if err := sim.run(); err != nil {
		t.Fatal(err)
	}
	if err := emu.run(); err != nil {
		t.Fatal(err)
	}
	compared := 0
	for i, p := range all {
		for j, o := range p.sim {
			got, want := sim.get(o.p, o.n), emu.get(p.emu[j].p, o.n)
			if o.name == "stats" {
				sameStats(t, fmt.Sprintf("scenario %d stats", i), got, statsOf(want))
				continue
			}
			if o.name == "sum" {
				g, w := math.Float64frombits(binary.LittleEndian.Uint64(got)), math.Float64frombits(binary.LittleEndian.Uint64(want))
				if math.Abs(g-w) > 1e-12*math.Abs(w) {
					t.Errorf("scenario %d: sum %v, kernel %v", i, g, w)
				}
				continue
			}
			sameBytes(t, fmt.Sprintf("scenario %d %s", i, o.name), got, want)
			compared += o.n
		}
	}
	for _, fc := range flagChecks {
		for _, o := range fc.outs {
			if strings.HasPrefix(o.name, "flags") {
				if got := sim.get(o.p, 4); !bytes.Equal(got, []byte{fc.want, 0, 0, 0}) {
					t.Errorf("%s: %s %v, want %#x", fc.name, o.name, got, fc.want)
				}
			}
		}
	}
	t.Logf("%d scenarios, %d bytes equal to the kernels'", len(all), compared)
}

func TestLaunchErrors(t *testing.T) {
	d := newDevice(t)
	s := alloc(t, d, 1<<16)
	gone := alloc(t, d, 4096)
	if err := d.Free(gone); err != nil {
		t.Fatal(err)
	}
	good, err := gpu.DequantizeCall(s.Ptr, s.Ptr+4096, 1000, 64, s.Ptr+8192, gpu.DTypeF32)
	if err != nil {
		t.Fatal(err)
	}
	fuse, err := gpu.FuseCall(gpu.FuseLayer{Packed: s.Ptr, Absmax: s.Ptr + 8192, Out: 64, In: 256, Blocksize: 64,
		A: s.Ptr + 12288, B: s.Ptr + 32768, Rank: 16, DType: gpu.DTypeBF16})
	if err != nil {
		t.Fatal(err)
	}
	fuseStats, err := gpu.FuseCall(gpu.FuseLayer{Packed: s.Ptr, Absmax: s.Ptr + 8192, Out: 64, In: 256, Blocksize: 64,
		A: s.Ptr + 12288, B: s.Ptr + 32768, Rank: 16, DType: gpu.DTypeBF16, Stats: s.Ptr + 40960})
	if err != nil {
		t.Fatal(err)
	}
	with := func(c gpu.Call, f func(*gpu.Call)) gpu.Call {
		c.Args = append([]gpu.Arg(nil), c.Args...)
		f(&c)
		return c
	}
	for _, c := range []struct {
		name string
		call gpu.Call
		want string
	}{
		{"unknown kernel", with(good, func(c *gpu.Call) { c.Kernel = "nf4_bogus" }), "launch nf4_bogus: no such kernel"},
		{"short arguments", with(fuse, func(c *gpu.Call) { c.Args = c.Args[:len(c.Args)-1] }), "nf4_fuse2d: 10 arguments, the kernel takes 11"},
		{"plain fuse given stats", with(fuse, func(c *gpu.Call) { c.Args = append(c.Args, fuseStats.Args[11]) }), "nf4_fuse2d: 12 arguments, the kernel takes 11"},
		{"stats fuse without stats", with(fuseStats, func(c *gpu.Call) { c.Args = c.Args[:len(c.Args)-1] }), "nf4_fuse2d_stats: 11 arguments, the kernel takes 12"},
		{"stats fuse with null stats", with(fuseStats, func(c *gpu.Call) { c.Args[11].V = 0 }), "launch nf4_fuse2d_stats: stats is null"},
		{"stats fuse shared memory", with(fuseStats, func(c *gpu.Call) { c.Shared = gpu.MaxSharedBytes - 8 }), "and 768 static (the sums' reduction) exceed 49152"},
		{"wrong kind", with(good, func(c *gpu.Call) { c.Args[2].Kind = 'd' }), "argument 2 (n) of kind 'd', want 'i'"},
		{"freed output", with(good, func(c *gpu.Call) { c.Args[4].V = uint64(gone.Ptr) }), "argument 4 (out): " + fmt.Sprintf("%#x", gone.Ptr) + " + 4000 bytes: in a slab of 4096 bytes at"},
		{"output past the end", with(good, func(c *gpu.Call) { c.Args[4].V = uint64(s.Ptr + 1<<16 - 100) }), "argument 4 (out)"},
		{"null absmax", with(good, func(c *gpu.Call) { c.Args[1].V = 0 }), "argument 1 (absmax): 0x0 + 64 bytes: not in any live allocation"},
		{"bad dtype", with(good, func(c *gpu.Call) { c.Args[5].V = 3 }), "dtype 3"},
		{"odd blocksize", with(good, func(c *gpu.Call) { c.Args[3].V = 63 }), "bs 63"},
		{"short shared memory", with(fuse, func(c *gpu.Call) { c.Shared -= 4 * gpu.FuseRankChunk }), "26816 bytes of shared memory, tile_cols 64 needs 26880"},
		{"fuse2d blocksize not dividing", with(fuse, func(c *gpu.Call) { c.Args[3].V = 250 }), "needs a power-of-two blocksize dividing in_dim"},
		{"fuse2d block size", with(fuse, func(c *gpu.Call) { c.Block = 128 }), "block 128, the kernel needs 256"},
		{"zero grid", with(good, func(c *gpu.Call) { c.Grid = 0 }), "grid 0"},
		{"fuse dtype", with(fuse, func(c *gpu.Call) { c.Args[9].V = 7 }), "dtype 7"},
		{"fuse stats freed", with(fuseStats, func(c *gpu.Call) { c.Args[11].V = uint64(gone.Ptr) }), "argument 11 (stats)"},
		{"fuse stats kind", with(fuseStats, func(c *gpu.Call) { c.Args[11].Kind = 'i' }), "argument 11 (stats) of kind 'i', want 'p'"},
		{"fuse flags freed", with(fuse, func(c *gpu.Call) { c.Args[10].V = uint64(gone.Ptr) }), "argument 10 (flags)"},
		{"fuse flags kind", with(fuseStats, func(c *gpu.Call) { c.Args[10].Kind = 'i' }), "argument 10 (flags) of kind 'i', want 'p'"},
		{"fuse stats dtype", with(fuseStats, func(c *gpu.Call) { c.Args[9].V = 7 }), "dtype 7"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := d.Launch(c.call)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
	if d.Pending() != 0 {
		t.Fatalf("%d rejected launches queued", d.Pending())
	}
	if err := d.Launch(good); err != nil {
		t.Fatal(err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestLaunchQueued: a launch is not visible before Sync; Download syncs;
// a launch whose memory is gone by the time it runs fails at Sync, naming
// the kernel and argument, and drops the work queued after it.
func TestLaunchQueued(t *testing.T) {
	d := newDevice(t)
	rng := rand.New(rand.NewPCG(3, 4))
	src := emutest.Weights(rng, 512, 64)
	s := alloc(t, d, 4096)
	upload(t, d, s.Ptr, emutest.F32LE(src))
	c, err := gpu.QuantizeCall(s.Ptr, gpu.DTypeF32, 512, 64, s.Ptr+2048, s.Ptr+3072)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Launch(c); err != nil {
		t.Fatal(err)
	}
	m := d.maps[0]
	if !bytes.Equal(m.mem[2048:], make([]byte, 2048)) {
		t.Fatal("launch ran before Sync")
	}
	wantP, wantA := make([]byte, 256), make([]float32, 8)
	nf4.Quantize(wantP, wantA, src, 64, nf4.QuantNF4)
	sameBytes(t, "packed", download(t, d, s.Ptr+2048, 256), wantP)
	sameBytes(t, "absmax", m.mem[3072:3072+32], emutest.F32LE(wantA))

	// Every free in the API runs the queue first, so a queued launch cannot
	// lose its memory; the check when it runs is a second line, exercised
	// here by releasing the scratch through the table.
	sc, err := d.MemAlloc(4096)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := gpu.DequantizeCall(s.Ptr+2048, s.Ptr+3072, 512, 64, sc, gpu.DTypeF32)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Launch(c2); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(s.Ptr, 16); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	scm := d.findLocked(sc)
	err = d.releaseLocked(scm)
	d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	err = d.Sync()
	if err == nil || !strings.Contains(err.Error(), "queued nf4_dequantize: launch nf4_dequantize: argument 4 (out)") ||
		!strings.Contains(err.Error(), "already freed") || !strings.Contains(err.Error(), "1 later operations dropped") {
		t.Fatalf("launch on freed memory: %v", err)
	}
	if got := download(t, d, s.Ptr, 16); bytes.Equal(got, make([]byte, 16)) {
		t.Fatal("the zero queued after a failed launch ran")
	}
}

// TestConcurrent: goroutines sharing one device each run their own
// upload, copy, launch and download; run with -race.
func TestConcurrent(t *testing.T) {
	d := newDevice(t)
	errs := make(chan error, 4)
	for g := range 4 {
		go func() {
			errs <- func() error {
				src := emutest.Weights(rand.New(rand.NewPCG(uint64(g), 5)), 1000, 64)
				s, err := d.Alloc(8192)
				if err != nil {
					return err
				}
				defer d.Free(s)
				sc, err := d.MemAlloc(4000)
				if err != nil {
					return err
				}
				defer d.MemFree(sc)
				if err := d.Upload(context.Background(), sc, emutest.F32LE(src)); err != nil {
					return err
				}
				if err := d.CopyAsync(s.Ptr, sc, 4000); err != nil {
					return err
				}
				c, err := gpu.QuantizeCall(s.Ptr, gpu.DTypeF32, 1000, 64, s.Ptr+4096, s.Ptr+6144)
				if err != nil {
					return err
				}
				if err := d.Launch(c); err != nil {
					return err
				}
				got := make([]byte, 500)
				if err := d.Download(got, s.Ptr+4096); err != nil {
					return err
				}
				want, am := make([]byte, 500), make([]float32, 16)
				nf4.Quantize(want, am, src, 64, nf4.QuantNF4)
				if !bytes.Equal(got, want) {
					return fmt.Errorf("goroutine %d: packed codes differ", g)
				}
				return nil
			}()
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n, k, o := d.Live(); n+k+o != 0 {
		t.Fatalf("live after: %d slabs %d scratch %d opened", n, k, o)
	}
}
