// Package nf4 owns the bitsandbytes 4-bit codec: NF4 and FP4 quantize and
// dequantize, the nested ("double quant", compress_statistics) absmax
// encoding, the quant-state JSON bitsandbytes serializes, and the layout of a
// 4-bit weight's keys in a checkpoint (grouping, validation, dequantizing a
// whole weight, and producing the full key set for writers).
//
// The codec works on plain slices and bytes; it does not import the
// safetensors package. Callers hand it tensor headers (TensorMeta) and a
// function that returns a tensor's bytes.
//
// Byte-exactness rules (bitsandbytes 0.41–0.50, csrc/kernels.cu):
//
//   - A tensor is flattened row-major and cut into blocks of blocksize
//     elements; blocks may cross rows. absmax[b] = max |x| over the block's
//     real elements, float32.
//   - Quantize follows the CUDA kernel (the canonical producer):
//     xn = float32(x * float32(1/absmax)), no clamp; NF4 code = number of the
//     15 fp32 midpoints that xn is strictly greater than (ties go to the
//     lower code, NaN gives code 0); FP4 uses the kernel's sign + 7-threshold
//     tree. An all-zero block has absmax 0, 1/0 = +Inf, 0*Inf = NaN, so every
//     code is 0 (bytes 0x00).
//   - Packing: byte j holds element 2j in its HIGH nibble and 2j+1 in the
//     low nibble; an odd count pads the last low nibble with the code of 0.0
//     (7 for NF4, 0 for FP4).
//   - Dequantize: out = T(float32(code[q] * absmax[k/blocksize])) with T the
//     logical dtype (round to nearest even), no FMA anywhere: every product
//     is wrapped in an explicit float32() conversion.
//
// Quantize and dequantize are parallel over blocks (runtime.GOMAXPROCS
// workers) and allocate nothing per element.
//
// Measured against bitsandbytes 0.50.2 on its CPU backend (the tests under
// testdata/ run it): dequantizing files bitsandbytes wrote is bit-exact in
// the logical dtype; NF4 codes agree 100% with quantize_4bit on random bf16
// data (absmax identical); the nested offset equals torch's mean bit for bit
// (Mean, TorchMean); nested 8-bit codes agree ~99.7% because bnb's CPU
// kernel uses a 65536-bin lookup table where CUDA (and this package) use
// the exact binary search. Limits when matching bnb-on-CUDA output: CUDA
// builds with --use_fast_math, so its 1/absmax may differ from IEEE by an
// ulp (a code can change only for values within an ulp of a threshold), and
// its mean of absmax is a GPU reduction whose summation order differs.
// Dequantizing needs none of that: it is fully determined by the stored
// tensors and JSON.
package nf4

import (
	"encoding/binary"
	"math"
	"runtime"
	"sync"

	"github.com/arenahost/arenahost/shared/half"
)

// QuantType names a bitsandbytes 4-bit data type as the quant-state JSON
// spells it.
type QuantType string

// The two 4-bit types bitsandbytes serializes.
const (
	QuantNF4 QuantType = "nf4"
	QuantFP4 QuantType = "fp4"
)

// NF4 is bitsandbytes' NormalFloat4 table (get_4bit_type("nf4"), the CUDA
// nf4_dequantization_lut): index = 4-bit code, ascending, NF4[7] = 0.
var NF4 = [16]float32{
	-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
	-0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
	0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
	0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
}

// FP4 is bitsandbytes' FP4 decoding table as its CUDA and C++ CPU kernels
// apply it (fp4_dequantization_lut times a sign): the values
// {0, 0.0625, 8, 12, 4, 6, 2, 3} and their negations, in bit-pattern order,
// divided by 12 in float32. Index 8 is -0.0 (0 times sign -1), so code 8
// dequantizes to -0.0; the quant_map bitsandbytes serializes has +0.0 there
// instead (see QuantType.QuantMap).
var FP4 = func() (t [16]float32) {
	t = fp4QuantMap
	t[8] = float32(math.Copysign(0, -1))
	return t
}()

// fp4QuantMap is get_4bit_type("fp4"): the Python list holds the integer
// -0, which torch stores as +0.0.
var fp4QuantMap = func() (t [16]float32) {
	data := [16]float32{0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3}
	for i, v := range data {
		t[i] = v / 12
	}
	return t
}()

// QuantMap returns the 16-entry quant_map bitsandbytes serializes next to
// a weight of this type (get_4bit_type): NF4 as is, FP4 with +0.0 at
// index 8. It returns zeros for an unknown type.
func (qt QuantType) QuantMap() [16]float32 {
	switch qt {
	case QuantNF4:
		return NF4
	case QuantFP4:
		return fp4QuantMap
	}
	return [16]float32{}
}

// nf4Thresholds[k] = float32((NF4[k]+NF4[k+1])/2), which equals the float
// literal in every comparison of the CUDA dQuantizeNF4 tree. Entry 15 is a
// pad that the search never reads.
var nf4Thresholds = func() (t [16]float32) {
	for k := range 15 {
		t[k] = float32(NF4[k]+NF4[k+1]) / 2
	}
	t[15] = float32(math.Inf(1))
	return t
}()

// quantizeNF4 returns the NF4 code of a normalized value: the count of
// thresholds strictly below x. NaN fails every comparison and yields 0, as
// in CUDA. The count comes from nf4Bucket, indexed by the top 16 bits of x,
// plus one comparison with the only threshold that can lie in that bucket.
func quantizeNF4(x float32) byte {
	if x != x {
		return 0
	}
	q := nf4Bucket[math.Float32bits(x)>>16]
	if x > nf4Thresholds[q&15] {
		q++
	}
	return q
}

// nf4Bucket[p] is the NF4 code of the smallest float32 whose top 16 bits
// are p (sign, exponent and 7 mantissa bits). Thresholds are at least 0.08
// apart and a bucket is at most 1/128 of its magnitude wide, so a bucket
// holds at most one threshold and the code of any x in it is
// nf4Bucket[p] + (x > nf4Thresholds[nf4Bucket[p]]).
var nf4Bucket = func() (t [1 << 16]byte) {
	for p := range t {
		lo := math.Float32frombits(uint32(p) << 16) // smallest magnitude
		if p&0x8000 != 0 {
			// Negative: the largest magnitude is the smallest value.
			lo = math.Float32frombits(uint32(p)<<16 | 0xffff)
		}
		t[p] = nf4Count(lo) // 0 for NaN buckets; quantizeNF4 checks NaN first
	}
	return t
}()

// nf4Count is the definition: the number of thresholds strictly below x.
func nf4Count(x float32) byte {
	var q byte
	for _, th := range nf4Thresholds[:15] {
		if x > th {
			q++
		}
	}
	return q
}

// quantizeFP4 is the CUDA dQuantizeFP4 tree, literals included.
func quantizeFP4(x float32) byte {
	var sign byte
	if x < 0 {
		sign = 0b1000
	}
	x = float32(math.Abs(float64(x)))
	switch {
	case x > 0.29166667:
		switch {
		case x > 0.583333:
			if x > 0.8333333 {
				return 0b0011 + sign
			}
			return 0b0010 + sign
		case x > 0.4166667:
			return 0b101 + sign
		default:
			return 0b100 + sign
		}
	case x > 0.0859375:
		if x > 0.20833333 {
			return 0b0111 + sign
		}
		return 0b0110 + sign
	case x > 0.00260417:
		return 0b0001 + sign
	default:
		return 0b0000 + sign
	}
}

// Table returns the dequantization table of a quant type, or nil for an
// unknown one.
func (qt QuantType) Table() *[16]float32 {
	switch qt {
	case QuantNF4:
		return &NF4
	case QuantFP4:
		return &FP4
	}
	return nil
}

// Blocks returns the number of blocks of blocksize that n elements occupy:
// ceil(n/blocksize).
func Blocks(n, blocksize int) int { return (n + blocksize - 1) / blocksize }

// PackedLen returns the number of packed bytes n 4-bit codes occupy.
func PackedLen(n int) int { return (n + 1) / 2 }

// ValidBlocksize reports whether bitsandbytes accepts a 4-bit blocksize:
// a power of two from 32 to 4096.
func ValidBlocksize(bs int) bool { return bs >= 32 && bs <= 4096 && bs&(bs-1) == 0 }

// Quantize encodes src (len(src) elements, row-major) into packed 4-bit
// codes and per-block float32 absmax by the CUDA kernel's rule (see the
// package comment). packed must hold PackedLen(len(src)) bytes and absmax
// Blocks(len(src), blocksize) values; blocksize must be even (every valid
// bitsandbytes blocksize is), so blocks never split a byte. qt must be
// QuantNF4 or QuantFP4. Quantize reports misuse by panicking, like a slice
// index out of range: lengths are the caller's to compute.
func Quantize(packed []byte, absmax []float32, src []float32, blocksize int, qt QuantType) {
	n := len(src)
	if blocksize <= 0 || blocksize%2 != 0 {
		panic("nf4: Quantize: blocksize must be positive and even")
	}
	nb := Blocks(n, blocksize)
	packed = packed[:PackedLen(n)]
	absmax = absmax[:nb]
	fp4 := false
	switch qt {
	case QuantNF4:
	case QuantFP4:
		fp4 = true
	default:
		panic("nf4: Quantize: unknown quant type " + string(qt))
	}
	vec := !fp4 && vecBlocks(blocksize)
	parallelBlocks(nb, blocksize, func(b0, b1 int) {
		if vec {
			whole := min(b1, n/blocksize)
			if whole > b0 {
				quantVecNF4(packed, absmax, src, b0, whole, blocksize)
				b0 = whole
			}
		}
		for b := b0; b < b1; b++ {
			lo := b * blocksize
			hi := min(lo+blocksize, n)
			absmax[b] = quantizeBlock(packed[lo/2:(hi+1)/2], src[lo:hi], fp4)
		}
	})
}

// quantizeBlock quantizes one block's elements into out (PackedLen(len(x))
// bytes) and returns the block's absmax.
func quantizeBlock(out []byte, x []float32, fp4 bool) float32 {
	var am float32
	for _, v := range x {
		// fabsf then fmaxf: NaN never wins (fmaxf ignores a NaN operand).
		a := float32(math.Abs(float64(v)))
		if a > am {
			am = a
		}
	}
	inv := 1 / am
	even := len(x) &^ 1
	if fp4 {
		for i := 0; i < even; i += 2 {
			out[i/2] = quantizeFP4(float32(x[i]*inv))<<4 | quantizeFP4(float32(x[i+1]*inv))
		}
		if even < len(x) {
			out[even/2] = quantizeFP4(float32(x[even]*inv))<<4 | quantizeFP4(float32(0*inv))
		}
		return am
	}
	for i := 0; i < even; i += 2 {
		out[i/2] = quantizeNF4(float32(x[i]*inv))<<4 | quantizeNF4(float32(x[i+1]*inv))
	}
	if even < len(x) {
		// The kernel loads the missing element as 0 and scales it too: 0*inv
		// is 0 (code 7) unless the block is all zeros (NaN, code 0).
		out[even/2] = quantizeNF4(float32(x[even]*inv))<<4 | quantizeNF4(float32(0*inv))
	}
	return am
}

// Dequantize decodes n 4-bit codes from packed into dst as float32:
// dst[k] = float32(code[q_k] * absmax[k/blocksize]). dst must hold n values,
// packed PackedLen(n) bytes, absmax Blocks(n, blocksize) values; blocksize
// must be even. Use DequantizeTo for a 16-bit logical dtype: rounding the
// float32 result once is exactly what bitsandbytes does.
func Dequantize(dst []float32, packed []byte, absmax []float32, code *[16]float32, n, blocksize int) {
	dequantize(outF32(dst[:n]), packed, absmax, code, n, blocksize)
}

// DequantizeLogical is Dequantize followed by RoundTo(dst[:n], dtype), bit
// for bit, the way bitsandbytes' dequantize_4bit returns a weight of a
// 16-bit dtype as float32 values: each block's 16 products are rounded
// once instead of every value.
func DequantizeLogical(dst []float32, packed []byte, absmax []float32, code *[16]float32, n, blocksize int, dtype DType) {
	dequantize(outLogical{d: dst[:n], dtype: dtype}, packed, absmax, code, n, blocksize)
}

// DType is a logical (dequantized) element type as the quant-state JSON
// spells it.
type DType string

// The logical dtypes bitsandbytes 4-bit weights carry.
const (
	BFloat16 DType = "bfloat16"
	Float16  DType = "float16"
	Float32  DType = "float32"
)

// Size returns the element size in bytes, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case BFloat16, Float16:
		return 2
	case Float32:
		return 4
	}
	return 0
}

// SafetensorsDType returns the safetensors header spelling ("BF16") of a
// logical dtype, or "" for an unknown one.
func (d DType) SafetensorsDType() string {
	switch d {
	case BFloat16:
		return "BF16"
	case Float16:
		return "F16"
	case Float32:
		return "F32"
	}
	return ""
}

// DequantizeTo decodes like Dequantize but writes little-endian values of
// dtype into dst (n*dtype.Size() bytes), rounding the float32 product to
// nearest even as torch's .to(dtype) does. It panics on an unknown dtype.
func DequantizeTo(dst []byte, dtype DType, packed []byte, absmax []float32, code *[16]float32, n, blocksize int) {
	sz := dtype.Size()
	if sz == 0 {
		panic("nf4: DequantizeTo: unknown dtype " + string(dtype))
	}
	dequantize(outBytes{b: dst[:n*sz], dtype: dtype}, packed, absmax, code, n, blocksize)
}

func dequantize(out output, packed []byte, absmax []float32, code *[16]float32, n, blocksize int) {
	if blocksize <= 0 || blocksize%2 != 0 {
		panic("nf4: Dequantize: blocksize must be positive and even")
	}
	nb := Blocks(n, blocksize)
	packed = packed[:PackedLen(n)]
	absmax = absmax[:nb]
	vo, vec := out.(vecOutput)
	vec = vec && vecBlocks(blocksize) && vo.vec(nil, nil, code, 0, 0, 0)
	parallelBlocks(nb, blocksize, func(b0, b1 int) {
		if vec {
			whole := min(b1, n/blocksize)
			if whole > b0 {
				vo.vec(packed, absmax, code, b0, whole, blocksize)
				b0 = whole
			}
		}
		var tab [16]float32
		for b := b0; b < b1; b++ {
			am := absmax[b]
			for i, c := range code {
				tab[i] = float32(c * am) // one rounding: no FMA possible here
			}
			lo := b * blocksize
			hi := min(lo+blocksize, n)
			out.block(lo, hi, packed[lo/2:(hi+1)/2], &tab)
		}
	})
}

// output writes one dequantized block; implementations keep the element
// conversion out of the per-element dispatch.
type output interface {
	block(lo, hi int, packed []byte, tab *[16]float32)
}

// vecOutput is an output the vector kernels can write whole blocks
// [b0, b1) of; vec with b1 ≤ b0 only reports whether it can.
type vecOutput interface {
	vec(packed []byte, absmax []float32, code *[16]float32, b0, b1, bs int) bool
}

type outF32 []float32

func (o outF32) vec(packed []byte, absmax []float32, code *[16]float32, b0, b1, bs int) bool {
	dequantVec(o, packed, absmax, code, b0, b1, bs, false)
	return true
}

// outLogical is outF32 rounded to a logical dtype: each block's 16
// products are rounded once, which is what rounding every decoded value
// gives.
type outLogical struct {
	d     []float32
	dtype DType
}

func (o outLogical) vec(packed []byte, absmax []float32, code *[16]float32, b0, b1, bs int) bool {
	switch o.dtype {
	case BFloat16, Float32:
		dequantVec(o.d, packed, absmax, code, b0, b1, bs, o.dtype == BFloat16)
		return true
	}
	return false
}

func (o outLogical) block(lo, hi int, packed []byte, tab *[16]float32) {
	t := *tab
	RoundTo(t[:], o.dtype)
	outF32(o.d).block(lo, hi, packed, &t)
}

func (o outF32) block(lo, hi int, packed []byte, tab *[16]float32) {
	d := o[lo:hi]
	even := len(d) &^ 1
	for i := 0; i < even; i += 2 {
		p := packed[i/2]
		d[i] = tab[p>>4]
		d[i+1] = tab[p&15]
	}
	if even < len(d) {
		d[even] = tab[packed[even/2]>>4]
	}
}

type outBytes struct {
	b     []byte
	dtype DType
}

func (o outBytes) block(lo, hi int, packed []byte, tab *[16]float32) {
	switch o.dtype {
	case Float32:
		d := o.b[4*lo : 4*hi]
		m := hi - lo
		even := m &^ 1
		for j, p := range packed[:even/2] {
			binary.LittleEndian.PutUint64(d[8*j:], uint64(math.Float32bits(tab[p>>4]))|uint64(math.Float32bits(tab[p&15]))<<32)
		}
		if even < m {
			binary.LittleEndian.PutUint32(d[4*even:], math.Float32bits(tab[packed[even/2]>>4]))
		}
	default:
		var h [16]uint16
		if o.dtype == Float16 {
			for i, v := range tab {
				h[i] = half.F32ToF16(v)
			}
		} else {
			for i, v := range tab {
				// half.F32ToBF16, inlined: round to nearest even, NaN → 0xFFFF.
				b := math.Float32bits(v)
				h[i] = uint16((b + 0x7fff + (b>>16)&1) >> 16)
				if b&0x7fffffff > 0x7f800000 {
					h[i] = 0xffff
				}
			}
		}
		d := o.b[2*lo : 2*hi]
		m := hi - lo
		even := m &^ 1
		pk := packed[:even/2]
		d4 := d[:2*even]
		for j, p := range pk {
			binary.LittleEndian.PutUint32(d4[4*j:], uint32(h[p>>4])|uint32(h[p&15])<<16)
		}
		if even < m {
			a := h[packed[even/2]>>4]
			d[2*even], d[2*even+1] = byte(a), byte(a>>8)
		}
	}
}

// minParallelElems is the work below which the pool is not worth starting.
const minParallelElems = 1 << 16

// parallelBlocks runs fn over [0, nb) split into contiguous chunks, on up to
// GOMAXPROCS goroutines, each chunk covering roughly equal elements.
func parallelBlocks(nb, blocksize int, fn func(b0, b1 int)) {
	workers := runtime.GOMAXPROCS(0)
	if workers <= 1 || nb*blocksize < minParallelElems || nb < 2 {
		fn(0, nb)
		return
	}
	chunks := min(nb, workers*16) // small chunks balance load on a busy machine
	per := (nb + chunks - 1) / chunks
	var wg sync.WaitGroup
	next := make(chan int, chunks)
	for b := 0; b < nb; b += per {
		next <- b
	}
	close(next)
	for range min(workers, chunks) {
		wg.Go(func() {
			for b0 := range next {
				fn(b0, min(b0+per, nb))
			}
		})
	}
	wg.Wait()
}

// RoundTo rounds float32 values in place to dtype (round to nearest even),
// keeping them as float32: the final cast of bitsandbytes' dequantize_4bit,
// and so the base that PEFT's merge adds LoRA deltas to. Float32 (and any
// other dtype) leaves v unchanged.
func RoundTo(v []float32, dt DType) {
	switch dt {
	case BFloat16:
		for i, x := range v {
			v[i] = half.BF16ToF32(half.F32ToBF16(x))
		}
	case Float16:
		for i, x := range v {
			v[i] = half.F16ToF32(half.F32ToF16(x))
		}
	}
}
