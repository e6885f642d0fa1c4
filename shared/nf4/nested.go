package nf4

import (
	"math"
	"sync"
)

// NestedBlocksize is the block size bitsandbytes uses for the second
// (nested) quantization of absmax.
const NestedBlocksize = 256

// dynamicMapBits is bitsandbytes' create_dynamic_map(signed=True,
// max_exponent_bits=7, total_bits=8) as torch >= 2.0 computes it on an x86-64
// or arm64 build whose linspace kernel is contracted into FMA (the usual
// install), as float32 bit patterns, ascending. Index 127 is 0, index 255 is
// 1.0, index 0 is -0.99296875. Other torch builds differ in the last ulp of
// about 42 entries; readers therefore always use the map stored in the file.
var dynamicMapBits = [256]uint32{
	0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, // 0
	0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, // 8
	0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, // 16
	0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, // 24
	0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, // 32
	0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000, // 40
	0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd, // 48
	0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334, // 56
	0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a, // 64
	0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, // 72
	0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, // 80
	0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, // 88
	0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, // 96
	0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, // 104
	0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b, // 112
	0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000, // 120
	0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b, // 128
	0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, // 136
	0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, // 144
	0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, // 152
	0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, // 160
	0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, // 168
	0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, // 176
	0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, // 184
	0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd, // 192
	0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, // 200
	0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, // 208
	0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, // 216
	0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, // 224
	0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, // 232
	0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, // 240
	0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000, // 248
}

// DynamicMap returns bitsandbytes' signed dynamic 8-bit map (see
// dynamicMapBits). It is for writing nested absmax only: a loader must use
// the nested_quant_map stored next to the weight.
func DynamicMap() [256]float32 {
	var m [256]float32
	for i, b := range dynamicMapBits {
		m[i] = math.Float32frombits(b)
	}
	return m
}

// QuantizeDynamic is the CUDA dQuantize<0> binary search over a sorted
// 256-entry map (bitsandbytes' nested-absmax quantizer, and kernels.cu's
// dynamic_code): the nearest code, with an exact midpoint tie going to the
// final probe. NaN fails every comparison and yields code 0.
func QuantizeDynamic(code *[256]float32, x float32) byte {
	pivot, upperPivot, lowerPivot := 127, 255, 0
	lower, upper := float32(-1), float32(1)
	val := code[pivot]
	for i := 64; i > 0; i >>= 1 {
		if x > val {
			lowerPivot, lower = pivot, val
			pivot += i
		} else {
			upperPivot, upper = pivot, val
			pivot -= i
		}
		val = code[pivot]
	}
	if upperPivot == 255 {
		upper = code[255]
	}
	if lowerPivot == 0 {
		lower = code[0]
	}
	if x > val {
		mid := float32(float32(upper+val) * 0.5)
		if x > mid {
			return byte(upperPivot)
		}
		return byte(pivot)
	}
	mid := float32(float32(lower+val) * 0.5)
	if x < mid {
		return byte(lowerPivot)
	}
	return byte(pivot)
}

// dynBuckets accelerates QuantizeDynamic over DynamicMap(). Floats are
// ordered by key (see orderKey) and grouped by the key's top 16 bits; the
// binary search's result is a non-decreasing step function of x, so within
// a bucket it is code[p] below thr[p] and code[p]+1 from thr[p] on, when the
// bucket holds at most one step (slow[p] marks buckets that hold more, and
// those keep the binary search).
type dynBuckets struct {
	m    [256]float32
	code [1 << 16]byte
	thr  [1 << 16]uint32
	slow [1 << 16]bool
}

var (
	dynOnce  sync.Once
	dynTable *dynBuckets
)

// orderKey maps float32 bits to a uint32 that orders like the values
// (-0 just below +0; NaNs at the ends).
func orderKey(b uint32) uint32 {
	if b&0x80000000 != 0 {
		return ^b
	}
	return b | 0x80000000
}

func fromKey(k uint32) float32 {
	if k&0x80000000 != 0 {
		return math.Float32frombits(k &^ 0x80000000)
	}
	return math.Float32frombits(^k)
}

func dynamicBuckets() *dynBuckets {
	dynOnce.Do(func() {
		t := &dynBuckets{m: DynamicMap()}
		for p := range uint32(1 << 16) {
			lo, hi := p<<16, p<<16|0xffff
			xl, xh := fromKey(lo), fromKey(hi)
			if xl != xl || xh != xh {
				t.slow[p] = true // NaN keys: QuantizeDynamic handles them
				continue
			}
			cl, ch := QuantizeDynamic(&t.m, xl), QuantizeDynamic(&t.m, xh)
			t.code[p] = cl
			switch {
			case ch == cl:
				t.thr[p] = math.MaxUint32
			case ch == cl+1:
				// Smallest key in (lo, hi] whose code is cl+1.
				a, b := lo, hi
				for b-a > 1 {
					mid := a + (b-a)/2
					if QuantizeDynamic(&t.m, fromKey(mid)) == cl {
						a = mid
					} else {
						b = mid
					}
				}
				t.thr[p] = b
			default:
				t.slow[p] = true
			}
		}
		dynTable = t
	})
	return dynTable
}

// quantize returns QuantizeDynamic(&DynamicMap(), x).
func (t *dynBuckets) quantize(x float32) byte {
	k := orderKey(math.Float32bits(x))
	p := k >> 16
	if t.slow[p] {
		return QuantizeDynamic(&t.m, x)
	}
	c := t.code[p]
	if k >= t.thr[p] {
		c++
	}
	return c
}

// QuantizeNested compresses float32 absmax the way bitsandbytes'
// quantize_4bit(compress_statistics=True) does, with offset = Mean(absmax)
// (torch's single-threaded float32 mean; see QuantizeNestedOffset to supply
// another, e.g. TorchMean with torch's thread count).
func QuantizeNested(absmax []float32) (q []byte, nestedAbsmax []float32, offset float32) {
	offset = Mean(absmax)
	q, nestedAbsmax = QuantizeNestedOffset(absmax, offset)
	return q, nestedAbsmax, offset
}

// QuantizeNestedOffset is QuantizeNested with a given offset, following the
// CUDA kernels' rules: a' = float32(absmax - offset); a' is cut into blocks
// of NestedBlocksize; nestedAbsmax[c] = max |a'| over block c; each a' is
// scaled by float32(1/nestedAbsmax[c]) and mapped to the nearest entry of
// DynamicMap() by the dQuantize binary search. A block whose a' are all 0
// gets nestedAbsmax 0 and codes 0 (0*Inf is NaN), which dequantize back to
// exactly offset.
func QuantizeNestedOffset(absmax []float32, offset float32) (q []byte, nestedAbsmax []float32) {
	q = make([]byte, len(absmax))
	nestedAbsmax = make([]float32, Blocks(len(absmax), NestedBlocksize))
	m := DynamicMap()
	QuantizeNestedInto(q, nestedAbsmax, absmax, offset, &m)
	return q, nestedAbsmax
}

// QuantizeNestedInto is QuantizeNestedOffset into caller-owned q (len(absmax)
// bytes) and nestedAbsmax (Blocks(len(absmax), NestedBlocksize) values),
// mapping to the entries of code: the nested_quant_map stored with a
// weight, which a re-encoding in place must use because it is what
// readers decode with (a torch build may have rounded a few entries of
// bitsandbytes' map differently from DynamicMap()). It is the fused pass's
// re-encoding of a nested weight's absmax, and kernels.cu's
// nested_quantize.
func QuantizeNestedInto(q []byte, nestedAbsmax []float32, absmax []float32, offset float32, code *[256]float32) {
	quantize := func(x float32) byte { return QuantizeDynamic(code, x) }
	if t := dynamicBuckets(); *code == t.m {
		quantize = t.quantize
	}
	q = q[:len(absmax)]
	nestedAbsmax = nestedAbsmax[:Blocks(len(absmax), NestedBlocksize)]
	var shifted [NestedBlocksize]float32
	for c := range nestedAbsmax {
		lo := c * NestedBlocksize
		hi := min(lo+NestedBlocksize, len(absmax))
		s := shifted[:hi-lo]
		var am float32
		for i, a := range absmax[lo:hi] {
			s[i] = a - offset
			if v := float32(math.Abs(float64(s[i]))); v > am {
				am = v
			}
		}
		nestedAbsmax[c] = am
		inv := 1 / am
		for i, v := range s {
			q[lo+i] = quantize(float32(v * inv))
		}
	}
}

// DequantizeNested rebuilds float32 absmax from its nested encoding, as
// bitsandbytes' dequantize_4bit does (dequantize_blockwise, then a separate
// add): dst[b] = float32(float32(nestedMap[q[b]] * nestedAbsmax[b/nestedBlocksize]) + offset),
// no FMA. dst must hold len(q) values and nestedAbsmax
// Blocks(len(q), nestedBlocksize).
func DequantizeNested(dst []float32, q []byte, nestedAbsmax []float32, nestedMap *[256]float32, offset float32, nestedBlocksize int) {
	dst = dst[:len(q)]
	nestedAbsmax = nestedAbsmax[:Blocks(len(q), nestedBlocksize)]
	for b, c := range q {
		p := float32(nestedMap[c] * nestedAbsmax[b/nestedBlocksize])
		dst[b] = float32(p + offset)
	}
}

// Mean returns the float32 mean of x the way torch computes tensor.mean() of
// a contiguous float32 CPU tensor on one thread of an AVX2 build:
// TorchMean(x, 1, 8). Empty input gives NaN.
func Mean(x []float32) float32 { return TorchMean(x, 1, 8) }

// torchGrainSize is at::internal::GRAIN_SIZE: reductions over fewer
// elements run on one thread.
const torchGrainSize = 32768

// TorchMean reproduces torch's float32 CPU tensor.mean() bit for bit:
// the sum of aten/src/ATen/native/cpu/SumKernel.cpp (cascade_sum: lanes-wide
// vectors — Vectorized<float>::size(), 8 on AVX2 and DEFAULT builds, 16 on
// AVX512 — summed with four interleaved accumulators and four cascade
// levels, then the scalar tail, then the lanes in order), divided once by
// len(x) in float32. threads is torch.get_num_threads(): inputs of 32768
// elements or more are then summed in nt = min(threads, ceil(n/32768))
// chunks of ceil(n/nt) (the two-pass reduction), and the threads-long
// buffer of partial sums is summed the same way. lanes must be 8 or 16.
// Empty input gives NaN.
func TorchMean(x []float32, threads, lanes int) float32 {
	if lanes != 16 {
		lanes = 8
	}
	n := len(x)
	if threads <= 1 || n < torchGrainSize {
		return torchSum(x, lanes) / float32(n)
	}
	nt := min(threads, (n+torchGrainSize-1)/torchGrainSize)
	chunk := (n + nt - 1) / nt
	buf := make([]float32, threads)
	for i := range nt {
		lo := i * chunk
		if lo >= n {
			break
		}
		buf[i] = torchSum(x[lo:min(n, lo+chunk)], lanes)
	}
	return torchSum(buf, lanes) / float32(n)
}

// vec is one Vectorized<float>; only the first lanes entries are used.
type vec [16]float32

func (v *vec) add(w *vec) {
	for i := range v {
		v[i] += w[i]
	}
}

// torchSum is SumKernel.cpp's cascade_sum for one contiguous row.
func torchSum(x []float32, lanes int) float32 {
	n := len(x)
	if n < lanes {
		return scalarRowSum(x)
	}
	nv := n / lanes
	load := func(i int) (v vec) {
		copy(v[:lanes], x[i*lanes:(i+1)*lanes])
		return v
	}
	// row_sum over nv vectors with ilp_factor 4.
	const ilp = 4
	sizeILP := nv / ilp
	acc := multiRowSumVec(sizeILP, func(i, k int) vec { return load(i*ilp + k) })
	for i := sizeILP * ilp; i < nv; i++ {
		v := load(i)
		acc[0].add(&v)
	}
	for k := 1; k < ilp; k++ {
		acc[0].add(&acc[k])
	}
	var final float32
	for k := nv * lanes; k < n; k++ {
		final += x[k]
	}
	for _, l := range acc[0][:lanes] {
		final += l
	}
	return final
}

// levelPower is multi_row_sum's cascade step: max(4, CeilLog2(size)/4).
func levelPower(size int) uint {
	c := 0
	for (1 << c) < size {
		c++
	}
	return uint(max(4, c/4))
}

// multiRowSumVec is multi_row_sum<Vectorized<float>, 4> over size rows.
func multiRowSumVec(size int, load func(i, k int) vec) [4]vec {
	const levels = 4
	lp := levelPower(size)
	step := 1 << lp
	mask := step - 1
	var acc [levels][4]vec
	i := 0
	for i+step <= size {
		for j := 0; j < step; j, i = j+1, i+1 {
			for k := range 4 {
				v := load(i, k)
				acc[0][k].add(&v)
			}
		}
		for j := 1; j < levels; j++ {
			for k := range 4 {
				acc[j][k].add(&acc[j-1][k])
				acc[j-1][k] = vec{}
			}
			if i&(mask<<(uint(j)*lp)) != 0 {
				break
			}
		}
	}
	for ; i < size; i++ {
		for k := range 4 {
			v := load(i, k)
			acc[0][k].add(&v)
		}
	}
	for j := 1; j < levels; j++ {
		for k := range 4 {
			acc[0][k].add(&acc[j][k])
		}
	}
	return acc[0]
}

// scalarRowSum is row_sum<float> (ilp 4) for rows shorter than a vector.
func scalarRowSum(x []float32) float32 {
	const ilp = 4
	sizeILP := len(x) / ilp
	var acc [4]float32
	// multi_row_sum with scalars; sizeILP < 2 here, so no cascade step runs.
	for i := range sizeILP {
		for k := range ilp {
			acc[k] += x[i*ilp+k]
		}
	}
	for i := sizeILP * ilp; i < len(x); i++ {
		acc[0] += x[i]
	}
	for k := 1; k < ilp; k++ {
		acc[0] += acc[k]
	}
	return acc[0]
}
