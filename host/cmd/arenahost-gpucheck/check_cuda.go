//go:build cuda

package main

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/half"
	"github.com/arenahost/arenahost/shared/lora"
	"github.com/arenahost/arenahost/shared/nf4"
)

const target = "≥ 99.99% identical"

// randWeights returns n values, normal with a scale that varies per block;
// every seventh block is all zeros when zeroBlocks is set.
func randWeights(rng *rand.Rand, n, bs int, zeroBlocks bool) []float32 {
	v := make([]float32, n)
	for b := 0; b*bs < n; b++ {
		scale := float32(math.Exp(rng.NormFloat64() * 1.5))
		zero := zeroBlocks && b%7 == 3
		for i := b * bs; i < min(n, (b+1)*bs); i++ {
			if !zero {
				v[i] = float32(rng.NormFloat64()) * scale * 0.02
			}
		}
	}
	return v
}

func nibble(p []byte, k int) byte {
	if k%2 == 0 {
		return p[k/2] >> 4
	}
	return p[k/2] & 15
}

func sameCodes(a, b []byte, n int) int64 {
	var s int64
	for k := 0; k < n; k++ {
		if nibble(a, k) == nibble(b, k) {
			s++
		}
	}
	return s
}

func sameBits(a, b []float32) int64 {
	var s int64
	for i := range a {
		if math.Float32bits(a[i]) == math.Float32bits(b[i]) {
			s++
		}
	}
	return s
}

func checkKernels(dev *gpu.Device, r *Report) error {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		n, bs, dtype int
		zero         bool
	}{
		{1001, 64, gpu.DTypeF32, true},
		{65, 32, gpu.DTypeF32, false},
		{1<<20 + 3, 64, gpu.DTypeF32, true},
		{100_000, 128, gpu.DTypeBF16, true},
		{4097, 4096, gpu.DTypeF32, false},
		{333, 256, gpu.DTypeF16, true},
	} {
		if err := checkQuantize(dev, r, rng, c.n, c.bs, c.dtype, c.zero); err != nil {
			return err
		}
	}
	if err := checkNested(dev, r, rng); err != nil {
		return err
	}
	// The Flux shapes in bf16, its logical dtype; the others cover f32 and
	// f16. Each runs the plain and the measuring (_stats) kernel; at
	// [5000 3] rank 68 their 1-D plans differ (tile 512 and 256: the
	// measuring kernel's reduction takes shared memory).
	for _, c := range []struct{ out, in, bs, rank, dtype int }{
		{37, 77, 64, 5, gpu.DTypeBF16}, {3072, 3072, 64, 16, gpu.DTypeBF16}, {100, 320, 64, 21, gpu.DTypeF16},
		{512, 3072, 64, 80, gpu.DTypeBF16}, {130, 1000, 256, 80, gpu.DTypeF32}, {5000, 3, 64, 64, gpu.DTypeF16},
		{5000, 3, 64, 68, gpu.DTypeBF16}, {100, 1, 64, 4096, gpu.DTypeF32}, {100, 320, 64, 21, gpu.DTypeF32},
	} {
		if err := checkFuse(dev, r, rng, c.out, c.in, c.bs, c.rank, c.dtype); err != nil {
			return err
		}
	}
	return checkSide(dev, r, rng)
}

var dtypeNames = map[int]string{gpu.DTypeF32: "f32", gpu.DTypeBF16: "bf16", gpu.DTypeF16: "f16"}

// nf4DTypes maps the kernels' dtype codes to shared/nf4's logical dtypes.
var nf4DTypes = map[int]nf4.DType{gpu.DTypeF32: nf4.Float32, gpu.DTypeBF16: nf4.BFloat16, gpu.DTypeF16: nf4.Float16}

func checkQuantize(dev *gpu.Device, r *Report, rng *rand.Rand, n, bs, dtype int, zero bool) error {
	p := newPool(dev)
	defer p.free()
	src := randWeights(rng, n, bs, zero)
	var raw []byte
	switch dtype {
	case gpu.DTypeF32:
		raw = f32Bytes(src)
	case gpu.DTypeBF16, gpu.DTypeF16:
		h := make([]uint16, n)
		for i, v := range src {
			if dtype == gpu.DTypeBF16 {
				h[i] = half.F32ToBF16(v)
				src[i] = half.BF16ToF32(h[i])
			} else {
				h[i] = half.F32ToF16(v)
				src[i] = half.F16ToF32(h[i])
			}
		}
		raw = u16Bytes(h)
	}
	nb := nf4.Blocks(n, bs)
	wantP, wantA := make([]byte, nf4.PackedLen(n)), make([]float32, nb)
	nf4.Quantize(wantP, wantA, src, bs, nf4.QuantNF4)

	dSrc, err := p.put(raw)
	if err != nil {
		return err
	}
	dP, err := p.alloc(len(wantP))
	if err != nil {
		return err
	}
	dA, err := p.alloc(4 * nb)
	if err != nil {
		return err
	}
	if err := dev.Quantize(dSrc, dtype, n, bs, dP, dA); err != nil {
		return err
	}
	gotP, err := p.get(dP, len(wantP))
	if err != nil {
		return err
	}
	gotA, err := p.getF32(dA, nb)
	if err != nil {
		return err
	}
	name := fmt.Sprintf("quantize n=%d bs=%d %s", n, bs, dtypeNames[dtype])
	if zero {
		name += " +zero blocks"
	}
	same := sameCodes(gotP, wantP, n)
	sameA := sameBits(gotA, wantA)
	r.Check("correctness", name, Identical(same, int64(n))+fmt.Sprintf(", absmax %d/%d", sameA, nb), target,
		IdenticalOK(same, int64(n)) && IdenticalOK(sameA, int64(nb)))

	// Dequantize the CPU's encoding to f32 and bf16.
	for _, odt := range []int{gpu.DTypeF32, gpu.DTypeBF16} {
		dP2, err := p.put(wantP)
		if err != nil {
			return err
		}
		dA2, err := p.putF32(wantA)
		if err != nil {
			return err
		}
		size := 4
		want := make([]byte, 4*n)
		if odt == gpu.DTypeBF16 {
			size = 2
			want = want[:2*n]
			nf4.DequantizeTo(want, nf4.BFloat16, wantP, wantA, &nf4.NF4, n, bs)
		} else {
			nf4.DequantizeTo(want, nf4.Float32, wantP, wantA, &nf4.NF4, n, bs)
		}
		dOut, err := p.alloc(size * n)
		if err != nil {
			return err
		}
		if err := dev.Dequantize(dP2, dA2, n, bs, dOut, odt); err != nil {
			return err
		}
		got, err := p.get(dOut, size*n)
		if err != nil {
			return err
		}
		var s int64
		for i := 0; i < n; i++ {
			if string(got[size*i:size*(i+1)]) == string(want[size*i:size*(i+1)]) {
				s++
			}
		}
		r.Check("correctness", fmt.Sprintf("dequantize n=%d bs=%d → %s", n, bs, dtypeNames[odt]), Identical(s, int64(n)), target, IdenticalOK(s, int64(n)))
	}
	return nil
}

func checkNested(dev *gpu.Device, r *Report, rng *rand.Rand) error {
	p := newPool(dev)
	defer p.free()
	const nb = 256*7 + 45 // a partial last nested block
	absmax := make([]float32, nb)
	for i := range absmax {
		absmax[i] = float32(math.Exp(rng.NormFloat64())) * 0.01
	}
	offset := nf4.Mean(absmax)
	for i := 256; i < 512; i++ { // a nested block whose a' are all zero
		absmax[i] = offset
	}
	wantQ, wantN := nf4.QuantizeNestedOffset(absmax, offset)
	m := nf4.DynamicMap()
	dAbs, err := p.putF32(absmax)
	if err != nil {
		return err
	}
	dMap, err := p.putF32(m[:])
	if err != nil {
		return err
	}
	dQ, err := p.alloc(nb)
	if err != nil {
		return err
	}
	dN, err := p.alloc(4 * len(wantN))
	if err != nil {
		return err
	}
	nested := gpu.Nested{Q: dQ, Absmax: dN, Map: dMap, Offset: offset}
	if err := dev.NestedQuantize(dAbs, nb, nested); err != nil {
		return err
	}
	gotQ, err := p.get(dQ, nb)
	if err != nil {
		return err
	}
	gotN, err := p.getF32(dN, len(wantN))
	if err != nil {
		return err
	}
	var s int64
	for i := range gotQ {
		if gotQ[i] == wantQ[i] {
			s++
		}
	}
	sn := sameBits(gotN, wantN)
	r.Check("correctness", fmt.Sprintf("nested quantize nb=%d (+zero nested block)", nb),
		Identical(s, nb)+fmt.Sprintf(", nested absmax %d/%d", sn, len(wantN)), target, IdenticalOK(s, nb) && sn == int64(len(wantN)))

	// Dequantize the CPU's nested encoding.
	dQ2, err := p.put(wantQ)
	if err != nil {
		return err
	}
	dN2, err := p.putF32(wantN)
	if err != nil {
		return err
	}
	dOut, err := p.alloc(4 * nb)
	if err != nil {
		return err
	}
	if err := dev.NestedDequantize(gpu.Nested{Q: dQ2, Absmax: dN2, Map: dMap, Offset: offset}, nb, dOut); err != nil {
		return err
	}
	got, err := p.getF32(dOut, nb)
	if err != nil {
		return err
	}
	want := make([]float32, nb)
	nf4.DequantizeNested(want, wantQ, wantN, &m, offset, nf4.NestedBlocksize)
	sd := sameBits(got, want)
	r.Check("correctness", fmt.Sprintf("nested dequantize nb=%d", nb), Identical(sd, nb), target, IdenticalOK(sd, nb))

	scratch, err := p.alloc(8)
	if err != nil {
		return err
	}
	mean, err := dev.AbsmaxMean(dAbs, nb, scratch)
	if err != nil {
		return err
	}
	cpu := nf4.Mean(absmax)
	rel := math.Abs(float64(mean-cpu)) / float64(cpu)
	r.Check("correctness", "nested offset (mean) vs torch-order float32 mean", fmt.Sprintf("rel. diff %.1e", rel), "< 1e-6", rel < 1e-6)
	return nil
}

func checkFuse(dev *gpu.Device, r *Report, rng *rand.Rand, out, in, bs, rank, dtype int) error {
	p := newPool(dev)
	defer p.free()
	n := out * in
	w := randWeights(rng, n, bs, true)
	nb := nf4.Blocks(n, bs)
	packed, absmax := make([]byte, nf4.PackedLen(n)), make([]float32, nb)
	nf4.Quantize(packed, absmax, w, bs, nf4.QuantNF4)
	a, b := make([]float32, rank*in), make([]float32, out*rank)
	for i := range a {
		a[i] = float32(rng.NormFloat64()) * 0.05
	}
	for i := range b {
		if rng.IntN(9) != 0 { // some zero groups, as padded B_cat columns have
			b[i] = float32(rng.NormFloat64()) * 0.05
		}
	}
	// CPU reference, shared/lora's fused pass: dequantize, round to the
	// logical dtype (as bitsandbytes' dequantize_4bit), DeltaRows, add, quantize.
	orig := make([]float32, n)
	nf4.Dequantize(orig, packed, absmax, &nf4.NF4, n, bs)
	nf4.RoundTo(orig, nf4DTypes[dtype])
	base := append([]float32(nil), orig...)
	sl := &lora.SideLayer{Layer: lora.Layer{Name: "check", Out: out, In: in}, Rank: rank, A: a, B: b}
	delta := make([]float32, n)
	sl.DeltaRows(delta, 0, out)
	for i := range orig {
		orig[i] += delta[i]
	}
	wantP, wantA := make([]byte, len(packed)), make([]float32, nb)
	nf4.Quantize(wantP, wantA, orig, bs, nf4.QuantNF4)
	// The retention sums as shared/lora measures them, in float64.
	eff := make([]float32, n)
	nf4.Dequantize(eff, wantP, wantA, &nf4.NF4, n, bs)
	nf4.RoundTo(eff, nf4DTypes[dtype])
	var wantS [3]float64
	for i := range eff {
		e, d := float64(eff[i])-float64(base[i]), float64(delta[i])
		wantS[0] += e * d
		wantS[1] += d * d
		wantS[2] += (e - d) * (e - d)
	}

	dP, err := p.put(packed)
	if err != nil {
		return err
	}
	dA, err := p.putF32(absmax)
	if err != nil {
		return err
	}
	dFa, err := p.putF32(a)
	if err != nil {
		return err
	}
	dFb, err := p.putF32(b)
	if err != nil {
		return err
	}
	if err := dev.Fuse(gpu.FuseLayer{Packed: dP, Absmax: dA, Out: out, In: in, Blocksize: bs, A: dFa, B: dFb, Rank: rank, DType: dtype}); err != nil {
		return err
	}
	gotP, err := p.get(dP, len(packed))
	if err != nil {
		return err
	}
	gotA, err := p.getF32(dA, nb)
	if err != nil {
		return err
	}
	s, sa := sameCodes(gotP, wantP, n), sameBits(gotA, wantA)
	r.Check("correctness", fmt.Sprintf("fused merge [%d %d] bs=%d rank %d %s (%s)", out, in, bs, rank, dtypeNames[dtype], fuseHow(out, in, bs, rank, false)),
		Identical(s, int64(n))+fmt.Sprintf(", absmax %d/%d", sa, nb), target, IdenticalOK(s, int64(n)) && IdenticalOK(sa, int64(nb)))

	// Again from the original bytes with the measuring kernel (_stats),
	// the retention sums: the same bytes, and sums equal to the CPU's to
	// 1e-9 (another order).
	sP, err := p.put(packed)
	if err != nil {
		return err
	}
	sA, err := p.putF32(absmax)
	if err != nil {
		return err
	}
	st, err := p.alloc(24)
	if err != nil {
		return err
	}
	if err := dev.Fuse(gpu.FuseLayer{Packed: sP, Absmax: sA, Out: out, In: in, Blocksize: bs, A: dFa, B: dFb, Rank: rank, DType: dtype, Stats: st}); err != nil {
		return err
	}
	if gotP, err = p.get(sP, len(packed)); err != nil {
		return err
	}
	if gotA, err = p.getF32(sA, nb); err != nil {
		return err
	}
	gotS, err := p.get(st, 24)
	if err != nil {
		return err
	}
	worst := 0.0
	for k, w := range wantS {
		g := math.Float64frombits(binary.LittleEndian.Uint64(gotS[8*k:]))
		worst = max(worst, math.Abs(g-w)/math.Abs(w))
	}
	s, sa = sameCodes(gotP, wantP, n), sameBits(gotA, wantA)
	ok := IdenticalOK(s, int64(n)) && IdenticalOK(sa, int64(nb)) && worst < 1e-9
	r.Check("correctness", fmt.Sprintf("fused merge [%d %d] %s measuring retention %.4f (%s)", out, in, dtypeNames[dtype], wantS[0]/wantS[1], fuseHow(out, in, bs, rank, true)),
		Identical(s, int64(n))+fmt.Sprintf(", absmax %d/%d, sums rel. diff %.1e", sa, nb, worst), target+", sums < 1e-9", ok)
	return nil
}

// fuseHow names the fused kernel FuseCall launches for the shape, plain or
// measuring, and its tiling.
func fuseHow(out, in, bs, rank int, stats bool) string {
	plan, err := gpu.PlanFuse(gpu.FuseShape{Out: out, In: in, Blocksize: bs, Rank: rank, Stats: stats})
	switch {
	case err != nil:
		return err.Error()
	case plan.TwoD():
		return fmt.Sprintf("%s, tile %d×%d", plan.Kernel, plan.TileRows, plan.TileCols)
	}
	return fmt.Sprintf("%s, tile %d, B in %s", plan.Kernel, plan.TileElems, map[bool]string{true: "smem", false: "cache"}[plan.BShared])
}

func checkSide(dev *gpu.Device, r *Report, rng *rand.Rand) error {
	p := newPool(dev)
	defer p.free()
	const out, in, rr, rank, col = 333, 129, 16, 48, 16
	const scale = float32(0.75 * 1.25)
	bsrc, asrc := make([]uint16, out*rr), make([]uint16, rr*in)
	for i := range bsrc {
		bsrc[i] = half.F32ToBF16(float32(rng.NormFloat64()))
	}
	for i := range asrc {
		asrc[i] = half.F32ToBF16(float32(rng.NormFloat64()))
	}
	dB, err := p.put(u16Bytes(bsrc))
	if err != nil {
		return err
	}
	dA, err := p.put(u16Bytes(asrc))
	if err != nil {
		return err
	}
	dBcat, err := p.alloc(4 * out * rank)
	if err != nil {
		return err
	}
	dAcat, err := p.alloc(4 * rank * in)
	if err != nil {
		return err
	}
	if err := dev.SideCols(dB, gpu.DTypeBF16, 0, out, rr, scale, dBcat, 0, rank, col); err != nil {
		return err
	}
	if err := dev.SideRows(dA, gpu.DTypeBF16, rr*in, 1, dAcat+gpu.DevicePtr(4*col*in)); err != nil {
		return err
	}
	gotB, err := p.getF32(dBcat, out*rank)
	if err != nil {
		return err
	}
	gotA, err := p.getF32(dAcat, rank*in)
	if err != nil {
		return err
	}
	wantB, wantA := make([]float32, out*rank), make([]float32, rank*in)
	for i := 0; i < out; i++ {
		for j := 0; j < rr; j++ {
			wantB[i*rank+col+j] = half.BF16ToF32(bsrc[i*rr+j]) * scale
		}
	}
	for i := range asrc {
		wantA[col*in+i] = half.BF16ToF32(asrc[i])
	}
	sb, sa := sameBits(gotB, wantB), sameBits(gotA, wantA)
	total := int64(len(wantB) + len(wantA))
	r.Check("correctness", "side factors: B_cat columns (scaled) and A_cat rows from bf16", Identical(sb+sa, total), "100% identical", sb+sa == total)
	return nil
}
