// NF4 kernels for arenahost (host/cuda). Compiled to PTX for compute_80 by
// build_ptx.py (NVRTC); the PTX is committed and embedded in the Go binary.
//
// Every kernel parameter is 8 bytes (pointers as unsigned long long,
// integers as long long, floats as double): gorgonia.org/cu copies each
// launch parameter as 8 bytes.
//
// Rules (bitsandbytes 4-bit, mirrored from shared/nf4, the CPU reference):
//   - codes: q = number of fp32 midpoint thresholds T[k] with x > T[k]
//     (strict >, ties go to the lower code, NaN gives 0);
//   - scaling: xn = fp32(x * inv), inv = fp32(1/absmax) (a reciprocal, then a
//     multiply; IEEE by default like the CPU codec, bitsandbytes' fast-math
//     approximate reciprocal with -DNF4_BNB_FAST_RCP);
//   - packing: element 2j in the HIGH nibble of byte j; an odd tail element
//     is paired with 0 scaled by inv;
//   - dequantize: fp32(NF4[q] * absmax[k / blocksize]);
//   - fused merge: the dequantized base is rounded to the weight's logical
//     dtype (round to nearest even, as bitsandbytes' dequantize_4bit and so
//     PEFT's merge, and shared/nf4.RoundTo) before the delta is added;
//   - nested absmax: fp32(fp32(map[q] * nabs[b / 256]) + offset), no FMA;
//   - every product and sum that the CPU rounds separately uses __fmul_rn /
//     __fadd_rn so no FMA contraction changes a bit (build_ptx.py also
//     passes -fmad=false); the one fused operation is the LoRA delta
//     product's, written out as __fmaf_rn (fuse_delta, fuse2d) as the CPU's
//     order has it (shared/lora DeltaRows: VFMADD231PS, simd.FMA32).

// NF4_EMULATE: compiled as host C++ by the CPU emulator (emu/), which
// supplies the CUDA builtins; see emu/emu.h.
#ifndef NF4_EMULATE
// 16-byte aligned: nf4_fuse2d's float4 loads and 16-byte cp.async copies
// rely on it.
#define EXTERN_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define NESTED_BLOCKSIZE 256

__constant__ float NF4_LUT[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// fp32 midpoints of neighbouring codes (bit patterns), ascending.
__constant__ u32 NF4_T[15] = {
    0xbf591cd8u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu,
    0xbe0d38bcu, 0xbd3a7871u, 0x3d22faffu, 0x3df64862u, 0x3e5067e0u,
    0x3e9582d4u, 0x3ec753f9u, 0x3f006d04u, 0x3f248dafu, 0x3f5c89dau};

__device__ __forceinline__ u32 nf4_code(float x) {
    u32 q = 0;
#pragma unroll
    for (int k = 0; k < 15; k++) q += x > __int_as_float((int)NF4_T[k]) ? 1u : 0u;
    return q;
}

__device__ __forceinline__ float nf4_rcp(float am) {
#ifdef NF4_BNB_FAST_RCP
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(am));
    return r;
#else
    return __frcp_rn(am);
#endif
}

// Round to nearest even; NaN becomes 0xFFFF (as shared/nf4 writes it).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 b = (u32)__float_as_int(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef NF4_EMULATE
    return emu_f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __int_as_float((int)((u32)h << 16)); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef NF4_EMULATE
    return emu_f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// dtype codes shared with launch.go: 0 float32, 1 bfloat16, 2 float16.
__device__ __forceinline__ void store_elem(void* out, i64 k, float v, i64 dtype) {
    if (dtype == 0) ((float*)out)[k] = v;
    else if (dtype == 1) ((u16*)out)[k] = f32_to_bf16(v);
    else ((u16*)out)[k] = f32_to_f16(v);
}

__device__ __forceinline__ float load_elem(const void* in, i64 k, i64 dtype) {
    if (dtype == 0) return ((const float*)in)[k];
    if (dtype == 1) return bf16_to_f32(((const u16*)in)[k]);
    return f16_to_f32(((const u16*)in)[k]);
}

// round_to: v rounded to dtype and back (0 float32: unchanged), as
// shared/nf4.RoundTo: the fused merge's base weight in its logical dtype.
__device__ __forceinline__ float round_to(float v, i64 dtype) {
    if (dtype == 1) return bf16_to_f32(f32_to_bf16(v));
    if (dtype == 2) return f16_to_f32(f32_to_f16(v));
    return v;
}

// round_dt: round_to for a dtype known at compile time.
template <int DT>
__device__ __forceinline__ float round_dt(float v) {
    if constexpr (DT == 1) return bf16_to_f32(f32_to_bf16(v));
    else if constexpr (DT == 2) return f16_to_f32(f32_to_f16(v));
    else return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Retention sums of the fused merge (stats_ != 0): per layer three doubles
// {Σ eff·delta, Σ delta², Σ (eff − delta)²}, as shared/lora's fused pass
// measures them: eff = new − base, both dequantized and rounded to the
// logical dtype (new from the re-quantized codes and absmax), widened to
// float64; delta the fp32 delta. Threads accumulate over their elements
// and tiles; each block adds its sums with one atomicAdd per figure.
__device__ __forceinline__ void fuse_stat(double* s, float nv, float orig, float d) {
    double eff = (double)nv - (double)orig, want = (double)d;
    s[0] += eff * want;
    s[1] += want * want;
    s[2] += (eff - want) * (eff - want);
}

// fuse_stats_flush: every thread of the block calls it once, at the end.
// Only the _stats entry points (STATS = true) reach it, so only they hold
// its shared array.
__device__ __forceinline__ void fuse_stats_flush(u64 stats_, double* s) {
    __shared__ double red[3 * 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < 3; k++) s[k] = warp_sum(s[k]);
    if (lane == 0)
        for (int k = 0; k < 3; k++) red[3 * warp + k] = s[k];
    __syncthreads();
    if (threadIdx.x < 3) {
        double t = 0.0;
        for (int w = 0; w < nwarps; w++) t += red[3 * w + threadIdx.x];
        atomicAdd((double*)stats_ + threadIdx.x, t);
    }
}

// Non-finite results of the fused merge (flags_ != 0): a huge strength or
// LoRA values near the float limits make a merged weight NaN or ±Inf
// (FUSE_BAD_MERGED, the fp32 base + delta), or a finite merge whose new
// absmax overflows the logical dtype, so the re-quantized weight would
// dequantize to ±Inf (FUSE_BAD_REQUANT: the block's largest element
// re-quantizes to code 0 or 15, ±absmax, so checking the absmax rounded to
// the dtype checks every element). These are shared/lora's fused-pass
// checks. Each thread ORs what it saw into a register and, at the end,
// once into the layer's flag word; the caller reads it back and restores
// the layer (the kernel still writes: blocks cannot see each other).
// fuse2d checks per quantization block instead, from the registers it
// holds there, and ORs at once.
#define FUSE_BAD_MERGED 1u
#define FUSE_BAD_REQUANT 2u

__device__ __forceinline__ u32 nonfinite(float v) { return ((u32)__float_as_int(v) & 0x7f800000u) == 0x7f800000u ? 1u : 0u; }

__device__ __forceinline__ void fuse_flag(u64 flags_, u32 bad) {
    if (flags_ && bad) atomicOr((u32*)flags_, bad);
}

// fuse_delta: one element's delta, (B·A)[r, c] for the B row brow, in the
// CPU's order (shared/lora DeltaRows): one chain of fused multiply-adds
// (__fmaf_rn, one rounding each), rank after rank, skipping a group of four
// ranks whose b are all zero and, past the last group, a rank whose b is
// zero.
__device__ __forceinline__ float fuse_delta(const float* brow, const float* __restrict__ A, i64 rank, i64 in_dim, i64 c) {
    float d = 0.0f;
    i64 k = 0;
    for (; k + 4 <= rank; k += 4) {
        float b0 = brow[k], b1 = brow[k + 1], b2 = brow[k + 2], b3 = brow[k + 3];
        if (b0 == 0.0f && b1 == 0.0f && b2 == 0.0f && b3 == 0.0f) continue;
        const float* a = A + k * in_dim + c;
        d = __fmaf_rn(b0, __ldg(a), d);
        d = __fmaf_rn(b1, __ldg(a + in_dim), d);
        d = __fmaf_rn(b2, __ldg(a + 2 * in_dim), d);
        d = __fmaf_rn(b3, __ldg(a + 3 * in_dim), d);
    }
    for (; k < rank; k++) {
        float bv = brow[k];
        if (bv != 0.0f) d = __fmaf_rn(bv, __ldg(A + k * in_dim + c), d);
    }
    return d;
}

// nf4_dequantize: out[k] = T(fp32(NF4[q_k] * absmax[k / bs])) for k < n.
// One thread per packed byte, grid-stride.
extern "C" __global__ void nf4_dequantize(u64 packed_, u64 absmax_, i64 n, i64 bs, u64 out_, i64 dtype) {
    const u8* packed = (const u8*)packed_;
    const float* absmax = (const float*)absmax_;
    void* out = (void*)out_;
    i64 bytes = (n + 1) / 2;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < bytes; j += (i64)gridDim.x * blockDim.x) {
        u32 p = packed[j];
        i64 e = 2 * j;
        store_elem(out, e, __fmul_rn(NF4_LUT[p >> 4], absmax[e / bs]), dtype);
        if (e + 1 < n) store_elem(out, e + 1, __fmul_rn(NF4_LUT[p & 15], absmax[(e + 1) / bs]), dtype);
    }
}

// nf4_quantize: one warp per quantization block, grid-stride over blocks.
// src holds n values of dtype (0 f32, 1 bf16, 2 f16).
extern "C" __global__ void nf4_quantize(u64 src_, i64 n, i64 bs, u64 packed_, u64 absmax_, i64 dtype) {
    const void* src = (const void*)src_;
    u8* packed = (u8*)packed_;
    float* absmax = (float*)absmax_;
    int lane = threadIdx.x & 31;
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
    i64 nb = (n + bs - 1) / bs;
    for (i64 b = warp; b < nb; b += nwarps) {
        i64 lo = b * bs, hi = min(lo + bs, n);
        float am = 0.0f;
        for (i64 i = lo + lane; i < hi; i += 32) am = fmaxf(am, fabsf(load_elem(src, i, dtype)));
        am = warp_max(am);
        if (lane == 0) absmax[b] = am;
        float inv = nf4_rcp(am);
        for (i64 j = lo / 2 + lane; j < (hi + 1) / 2; j += 32) {
            float x0 = load_elem(src, 2 * j, dtype);
            float x1 = 2 * j + 1 < hi ? load_elem(src, 2 * j + 1, dtype) : 0.0f;
            packed[j] = (u8)(nf4_code(__fmul_rn(x0, inv)) << 4 | nf4_code(__fmul_rn(x1, inv)));
        }
    }
}

// nested_dequantize: absmax[b] = fp32(fp32(map[q[b]] * nabs[b/256]) + offset).
extern "C" __global__ void nested_dequantize(u64 q_, u64 nabs_, u64 map_, double offset, i64 nb, u64 out_) {
    const u8* q = (const u8*)q_;
    const float* nabs = (const float*)nabs_;
    const float* map = (const float*)map_;
    float* out = (float*)out_;
    float off = (float)offset;
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < nb; b += (i64)gridDim.x * blockDim.x)
        out[b] = __fadd_rn(__fmul_rn(map[q[b]], nabs[b / NESTED_BLOCKSIZE]), off);
}

// dynamic_code: bitsandbytes' dQuantize<0> binary search over a sorted
// 256-entry map (nearest, an exact midpoint tie goes to the final probe).
__device__ __forceinline__ u32 dynamic_code(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (x > val) {
        float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return x > mid ? (u32)upper_pivot : (u32)pivot;
    }
    float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < mid ? (u32)lower_pivot : (u32)pivot;
}

// nested_quantize: one CUDA block of 256 threads per nested block.
// a' = fp32(absmax - offset); nabs[c] = max |a'|; q = dynamic_code(a' * fp32(1/nabs)).
extern "C" __global__ void nested_quantize(u64 absmax_, i64 nb, double offset, u64 map_, u64 q_, u64 nabs_) {
    __shared__ float code[256];
    __shared__ float red[8];
    const float* absmax = (const float*)absmax_;
    const float* map = (const float*)map_;
    u8* q = (u8*)q_;
    float* nabs = (float*)nabs_;
    float off = (float)offset;
    code[threadIdx.x] = map[threadIdx.x];
    i64 nc = (nb + NESTED_BLOCKSIZE - 1) / NESTED_BLOCKSIZE;
    for (i64 c = blockIdx.x; c < nc; c += gridDim.x) {
        i64 b = c * NESTED_BLOCKSIZE + threadIdx.x;
        float a = b < nb ? __fadd_rn(absmax[b], -off) : 0.0f;
        float m = warp_max(b < nb ? fabsf(a) : 0.0f);
        __syncthreads();
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
        __syncthreads();
        float am = red[0];
#pragma unroll
        for (int w = 1; w < 8; w++) am = fmaxf(am, red[w]);
        if (threadIdx.x == 0) nabs[c] = am;
        float inv = nf4_rcp(am);
        if (b < nb) q[b] = (u8)dynamic_code(code, __fmul_rn(a, inv));
    }
}

// absmax_sum: sum of nb floats into *out (double), for the nested offset
// (the mean). Partial sums per block, then one atomicAdd per block.
extern "C" __global__ void absmax_sum(u64 absmax_, i64 nb, u64 out_) {
    __shared__ double red[256];
    const float* absmax = (const float*)absmax_;
    double s = 0.0;
    for (i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x; b < nb; b += (i64)gridDim.x * blockDim.x) s += (double)absmax[b];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd((double*)out_, red[0]);
}

// nf4_fuse: the fused merge of one layer [out_dim × in_dim] (row-major,
// n = out_dim·in_dim elements): w = dequantize(packed, absmax) + B·A, then
// re-quantize in place. A is [rank × in_dim] and B [out_dim × rank], fp32,
// strengths and scales already folded into B. The dequantized base is
// rounded to dtype (0 float32: not rounded, 1 bfloat16, 2 float16), the
// layer's logical dtype, before the delta is added.
//
// One CUDA block per tile of `tile` elements (a multiple of bs, so tiles
// start on a quantization block and a byte), grid-stride over tiles. The
// merged tile lives in shared memory (tile floats), followed, when b_smem
// is set, by the B rows the tile spans (max_rows × rank floats); otherwise
// B is read through the read-only cache. No full-layer temporary exists.
// absmax is fp32 (decoded from nested storage beforehand when nested).
// nf4_fuse_stats (STATS, stats_ != 0, see fuse_stat) also measures: each
// warp measures its block while it re-quantizes it: the old codes and
// absmax give the base, and the delta is computed again (the same
// function, so the same bits). The body is a template so that nf4_fuse,
// which never measures, carries none of it (registers, the reduction's
// shared memory): the merge's occupancy is the plain kernel's.
template <bool STATS>
__device__ __forceinline__ void fuse1d(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                       u64 a_, u64 b_, i64 rank, i64 tile, i64 b_smem, i64 dtype, u64 flags_, u64 stats_) {
    EXTERN_SHARED(float, smem);
    float* w = smem;
    float* bs_rows = smem + tile;
    u8* packed = (u8*)packed_;
    float* absmax = (float*)absmax_;
    const float* __restrict__ A = (const float*)a_;
    const float* __restrict__ B = (const float*)b_;
    i64 n = out_dim * in_dim;
    i64 tiles = (n + tile - 1) / tile;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    double st[3] = {0.0, 0.0, 0.0};
    (void)st;
    u32 bad = 0;
    for (i64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        i64 e0 = t * tile, e1 = min(e0 + tile, n);
        i64 r0 = e0 / in_dim;
        __syncthreads();
        if (b_smem) {
            i64 r1 = (e1 - 1) / in_dim + 1;
            for (i64 i = threadIdx.x; i < (r1 - r0) * rank; i += blockDim.x) bs_rows[i] = B[r0 * rank + i];
            __syncthreads();
        }
        // 1. dequantize + delta into shared memory, element pairs per thread.
        for (i64 j = e0 / 2 + threadIdx.x; j < (e1 + 1) / 2; j += blockDim.x) {
            u32 p = packed[j];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                i64 e = 2 * j + h;
                if (e >= e1) break;
                float orig = round_to(__fmul_rn(NF4_LUT[h == 0 ? p >> 4 : p & 15], absmax[e / bs]), dtype);
                i64 r = e / in_dim, c = e - r * in_dim;
                const float* brow = b_smem ? bs_rows + (r - r0) * rank : B + r * rank;
                float x = __fadd_rn(orig, fuse_delta(brow, A, rank, in_dim, c));
                bad |= nonfinite(x);
                w[e - e0] = x;
            }
        }
        __syncthreads();
        // 2. re-quantize: one warp per quantization block of the tile.
        i64 nblk = (e1 - e0 + bs - 1) / bs;
        for (i64 q = warp; q < nblk; q += nwarps) {
            i64 lo = q * bs, hi = min(lo + bs, e1 - e0);
            float am = 0.0f;
            for (i64 i = lo + lane; i < hi; i += 32) am = fmaxf(am, fabsf(w[i]));
            am = warp_max(am);
            bad |= nonfinite(round_to(am, dtype)) << 1;
            // The block's old absmax, read by every lane before lane 0
            // overwrites it.
            float oam = 0.0f;
            if constexpr (STATS) {
                oam = absmax[(e0 + lo) / bs];
                __syncwarp();
            }
            (void)oam;
            if (lane == 0) absmax[(e0 + lo) / bs] = am;
            float inv = nf4_rcp(am);
            for (i64 jj = lo / 2 + lane; jj < (hi + 1) / 2; jj += 32) {
                float x0 = w[2 * jj];
                float x1 = 2 * jj + 1 < hi ? w[2 * jj + 1] : 0.0f;
                u32 np = nf4_code(__fmul_rn(x0, inv)) << 4 | nf4_code(__fmul_rn(x1, inv));
                if constexpr (STATS) {
                    u32 op = packed[e0 / 2 + jj];
                    for (int h = 0; h < 2 && 2 * jj + h < hi; h++) {
                        i64 e = e0 + 2 * jj + h;
                        i64 r = e / in_dim, c = e - r * in_dim;
                        const float* brow = b_smem ? bs_rows + (r - r0) * rank : B + r * rank;
                        float orig = round_to(__fmul_rn(NF4_LUT[h == 0 ? op >> 4 : op & 15], oam), dtype);
                        float nv = round_to(__fmul_rn(NF4_LUT[h == 0 ? np >> 4 : np & 15], am), dtype);
                        fuse_stat(st, nv, orig, fuse_delta(brow, A, rank, in_dim, c));
                    }
                }
                packed[e0 / 2 + jj] = (u8)np;
            }
        }
    }
    fuse_flag(flags_, bad);
    if constexpr (STATS) fuse_stats_flush(stats_, st);
}

// max_rows is the plan's (gpu.FusePlan.MaxRows): the kernel needs only the
// shared memory the launch gives it, so it is unused here. flags_: 0, or a
// u32 (zeroed) for the FUSE_BAD_* bits.
extern "C" __global__ void nf4_fuse(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                    u64 a_, u64 b_, i64 rank, i64 tile, i64 b_smem, i64 max_rows, i64 dtype,
                                    u64 flags_) {
    (void)max_rows;
    fuse1d<false>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile, b_smem, dtype, flags_, 0);
}

extern "C" __global__ void nf4_fuse_stats(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                          u64 a_, u64 b_, i64 rank, i64 tile, i64 b_smem, i64 max_rows, i64 dtype,
                                          u64 flags_, u64 stats_) {
    (void)max_rows;
    fuse1d<true>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile, b_smem, dtype, flags_, stats_);
}

// nf4_fuse2d: the fused merge for layers whose rows hold whole blocks
// (in_dim % bs == 0, bs a power of two ≤ tile_cols), the Flux case. A tile
// is FUSE_TILE elements: tile_rows = FUSE_TILE / tile_cols rows by
// tile_cols columns. B·A is accumulated in registers (16 elements per
// thread, blockDim.x must be 256) over rank chunks of FUSE_RC: each chunk
// stages A_cat[k0.., c0..] and B_cat[r0.., k0..] in shared memory, so each
// A value is read from global memory once per tile instead of once per
// element. The order (one chain of __fmaf_rn per element, rank after rank,
// all-zero groups of four and zero single ranks skipped) is shared/lora
// DeltaRows', so results equal the CPU's bit for bit.
// As in nf4_fuse, the dequantized base is rounded to dtype before the add.
// nf4_fuse2d_stats (STATS, see fuse_stat) also measures, in the
// re-quantizing warps, which hold each element's base, delta and new
// value; nf4_fuse2d carries none of it (see fuse1d).
#define FUSE_TILE 4096
#define FUSE_RC 16
#define FUSE_PER_THREAD (FUSE_TILE / 256)

// ilog2: log2 of a power of two (gpu.PlanFuse gives nf4_fuse2d powers of
// two for bs and tile_cols), computed once per thread.
__device__ __forceinline__ int ilog2(i64 v) {
    int l = 0;
    while (((i64)1 << l) < v) l++;
    return l;
}

// Vector loads from shared memory (16- and 8-byte aligned by construction).
#ifdef NF4_EMULATE
struct vec4 { float x, y, z, w; };
struct vec2 { float x, y; };
inline vec4 ld4(const float* p) { return vec4{p[0], p[1], p[2], p[3]}; }
inline vec2 ld2(const float* p) { return vec2{p[0], p[1]}; }
#else
typedef float4 vec4;
typedef float2 vec2;
__device__ __forceinline__ vec4 ld4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ vec2 ld2(const float* p) { return *(const float2*)p; }
#endif

// Asynchronous copies from global into shared memory (cp.async, sm_80):
// nf4_fuse2d stages a tile's old codes and absmax with them before the
// delta, so the loads overlap the products instead of stalling the
// re-quantizing warps once per block. The emulator copies at once (its
// wait is then a no-op: a missing wait goes unseen there, not on a GPU).
#ifdef NF4_EMULATE
inline void cp_async16(void* s, const void* g) { std::memcpy(s, g, 16); }
inline void cp_async4(void* s, const void* g) { std::memcpy(s, g, 4); }
inline void cp_async_wait() {}
inline void st16(void* g, const void* s) { std::memcpy(g, s, 16); }
#else
__device__ __forceinline__ void cp_async16(void* s, const void* g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(s)), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async4(void* s, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((u32)__cvta_generic_to_shared(s)), "l"(g) : "memory");
}
// Waits for this thread's copies; a __syncthreads then shows every
// thread's to the block.
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void st16(void* g, const void* s) { *(uint4*)g = *(const uint4*)s; }
#endif

// FUSE_PAIRS: element pairs one lane re-quantizes per quantization block
// (bs ≤ 256, so at most 128 pairs over 32 lanes).
#define FUSE_PAIRS 4

// tile_codes: moves a tile's codes (nr rows of nc / 2 bytes, row stride tb
// in pk) and absmax (nr rows of nc / bs values, stride tab in oab) between
// the layer and shared memory: in (LOAD) with cp.async, 16 bytes a copy
// when vec, else byte by byte; out with plain stores, 16 bytes when vec.
template <bool LOAD>
__device__ __forceinline__ void tile_codes(u8* packed, float* absmax, u8* pk, float* oab, i64 in_dim, i64 r0, i64 c0,
                                           int nr, int nc, int lg_bs, int tb, int tab, bool vec, int tid) {
    const int rb = nc >> 1, bpr = nc >> lg_bs;
    if (vec) {
        const int cpr = rb >> 4;
        for (int i = tid; i < nr * cpr; i += 256) {
            const int lr = i / cpr, ch = i - lr * cpr;
            u8* g = packed + (((r0 + lr) * in_dim + c0) >> 1) + (ch << 4);
            u8* sh = pk + lr * tb + (ch << 4);
            if constexpr (LOAD) cp_async16(sh, g);
            else st16(g, sh);
        }
    } else {
        for (int i = tid; i < nr * rb; i += 256) {
            const int lr = i / rb, j = i - lr * rb;
            u8* g = packed + (((r0 + lr) * in_dim + c0) >> 1) + j;
            u8* sh = pk + lr * tb + j;
            if constexpr (LOAD) *sh = *g;
            else *g = *sh;
        }
    }
    for (int i = tid; i < nr * bpr; i += 256) {
        const int lr = i / bpr, j = i - lr * bpr;
        float* g = absmax + (((r0 + lr) * in_dim + c0) >> lg_bs) + j;
        float* sh = oab + lr * tab + j;
        if constexpr (LOAD) cp_async4(sh, g);
        else *g = *sh;
    }
}

// Two phases per tile. Delta: tile_cols ≤ 256 divides 256, so element
// e = tid + 256·i of the tile (i < FUSE_PER_THREAD) is row lr0 + i·rstep,
// column lc, with lc = tid mod tile_cols and lr0 = tid / tile_cols the same
// for every i: a thread owns one column. Each group of four ranks loads the
// thread's four A values once and reuses them for its 16 rows; a row's B
// values are one 16-byte load (a broadcast: a warp's lanes share the row
// when tile_cols ≥ 32). The deltas go to shared memory. Re-quantize: one
// warp per quantization block; each lane reads its element pairs' old
// byte and the block's old absmax, dequantizes and rounds them to DT, adds
// the deltas, and once the warp has the new absmax writes the new byte
// (measuring, with STATS, from the same registers). In-tile indices are
// 32-bit; divisions by bs and tile_cols are shifts.
//
// PF (nf4_fuse2d, nf4_fuse2d_stats): the tile's old codes and absmax are
// copied into shared memory (cp.async) when the tile starts, so the loads
// run while the delta is computed; the warps re-quantize there and the
// block writes the tile back, 16 bytes a thread where the rows allow.
// Without PF (nf4_fuse2d_direct, which the GPU check times beside it) each
// warp reads and writes its block in global memory: one dependent round
// trip per block. The arithmetic, and so every result bit, is the same.
template <bool STATS, int DT, bool PF>
__device__ __forceinline__ void fuse2d(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                       u64 a_, u64 b_, i64 rank, i64 tile_cols, u64 flags_, u64 stats_) {
    __shared__ float lut[16];
    EXTERN_SHARED(float, smem);
    const int tc = (int)tile_cols, lg_tc = ilog2(tile_cols), lg_bs = ilog2(bs), ibs = (int)bs;
    const int tile_rows = FUSE_TILE >> lg_tc, rstep = 256 >> lg_tc;
    float* w = smem;                            // [tile_rows][tc]: the deltas
    float* as = w + FUSE_TILE;                  // [FUSE_RC][tc]
    float* bsm = as + FUSE_RC * tc;             // [tile_rows][FUSE_RC]
    float* oab = bsm + tile_rows * FUSE_RC;     // PF: [tile_rows][tc / bs], the absmax
    u8* pk = (u8*)(oab + (FUSE_TILE >> lg_bs)); // PF: [tile_rows][tc / 2], the codes
    u8* packed = (u8*)packed_;
    float* absmax = (float*)absmax_;
    const float* __restrict__ A = (const float*)a_;
    const float* __restrict__ B = (const float*)b_;
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4_LUT[threadIdx.x];
    const i64 row_tiles = (out_dim + tile_rows - 1) / tile_rows;
    const i64 col_tiles = (in_dim + tc - 1) / tc;
    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = (int)(blockDim.x >> 5);
    const int lc = tid & (tc - 1), lr0 = tid >> lg_tc;
    // PF: 16-byte copies when every tile row's codes start on 16 bytes and
    // hold a multiple of 16 (layer rows and tile columns multiples of 32).
    const bool vec = ((packed_ & 15) | (u64)(in_dim & 31) | (u64)(tc & 31)) == 0;
    const int tb = tc >> 1, tab = tc >> lg_bs;  // PF row strides: code bytes, absmax values
    (void)vec, (void)tb, (void)tab, (void)pk, (void)oab;
    double st[3] = {0.0, 0.0, 0.0};
    (void)st;
    for (i64 t = blockIdx.x; t < row_tiles * col_tiles; t += gridDim.x) {
        const i64 rt = t / col_tiles;
        const i64 r0 = rt * tile_rows, c0 = (t - rt * col_tiles) * tc;
        const int nr = (int)min((i64)tile_rows, out_dim - r0), nc = (int)min((i64)tc, in_dim - c0);
        const int bpr = nc >> lg_bs;
        if constexpr (PF) {
            // The previous tile's write-back has read pk and oab.
            __syncthreads();
            tile_codes<true>(packed, absmax, pk, oab, in_dim, r0, c0, nr, nc, lg_bs, tb, tab, vec, tid);
        }
        float d[FUSE_PER_THREAD];
#pragma unroll
        for (int i = 0; i < FUSE_PER_THREAD; i++) d[i] = 0.0f;
        for (i64 k0 = 0; k0 < rank; k0 += FUSE_RC) {
            __syncthreads();
            const int kn = (int)min((i64)FUSE_RC, rank - k0);
            for (int i = tid; i < FUSE_RC * tc; i += 256) {
                const int kk = i >> lg_tc, l = i & (tc - 1);
                as[i] = (kk < kn && l < nc) ? A[(k0 + kk) * in_dim + c0 + l] : 0.0f;
            }
            for (int i = tid; i < tile_rows * FUSE_RC; i += 256) {
                const int lr = i >> 4, kk = i & (FUSE_RC - 1);
                bsm[i] = (kk < kn && lr < nr) ? B[(r0 + lr) * rank + k0 + kk] : 0.0f;
            }
            __syncthreads();
            // Full groups of four as the CPU forms them (k + 4 <= rank),
            // then the remaining ranks one by one. Rows past nr have zero B
            // (skipped) and are never read back.
            const int kgroups = (int)(min(k0 + FUSE_RC, rank / 4 * 4) - k0);
            int kk = 0;
            for (; kk + 4 <= kgroups; kk += 4) {
                const float a0 = as[kk * tc + lc], a1 = as[(kk + 1) * tc + lc];
                const float a2 = as[(kk + 2) * tc + lc], a3 = as[(kk + 3) * tc + lc];
#pragma unroll
                for (int i = 0; i < FUSE_PER_THREAD; i++) {
                    const vec4 b = ld4(bsm + (lr0 + i * rstep) * FUSE_RC + kk);
                    if (b.x == 0.0f && b.y == 0.0f && b.z == 0.0f && b.w == 0.0f) continue;
                    float s = __fmaf_rn(b.x, a0, d[i]);
                    s = __fmaf_rn(b.y, a1, s);
                    s = __fmaf_rn(b.z, a2, s);
                    d[i] = __fmaf_rn(b.w, a3, s);
                }
            }
            for (; kk < kn; kk++) {
                const float a = as[kk * tc + lc];
#pragma unroll
                for (int i = 0; i < FUSE_PER_THREAD; i++) {
                    const float bv = bsm[(lr0 + i * rstep) * FUSE_RC + kk];
                    if (bv != 0.0f) d[i] = __fmaf_rn(bv, a, d[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < FUSE_PER_THREAD; i++) w[tid + 256 * i] = d[i];
        if constexpr (PF) cp_async_wait();
        __syncthreads();
        // Re-quantize: one warp per block; a row of the tile holds nc / bs
        // blocks.
        const int npairs = ibs >> 1;
        for (int qb = warp; qb < nr * bpr; qb += nwarps) {
            const int lr = qb / bpr, qi = qb - lr * bpr;
            const float* dx = w + lr * tc + (qi << lg_bs);
            const i64 gb = (r0 + lr) * in_dim + c0 + ((i64)qi << lg_bs);
            u8* pb = PF ? pk + lr * tb + ((qi << lg_bs) >> 1) : packed + (gb >> 1);
            float* pa = PF ? oab + lr * tab + qi : absmax + (gb >> lg_bs);
            const float oam = *pa;
            float x[2 * FUSE_PAIRS], o[2 * FUSE_PAIRS];
            float am = 0.0f;
#pragma unroll
            for (int k = 0; k < FUSE_PAIRS; k++) {
                const int jj = lane + 32 * k;
                if (jj >= npairs) break;
                const u32 p = pb[jj];
                const vec2 dd = ld2(dx + 2 * jj);
                o[2 * k] = round_dt<DT>(__fmul_rn(lut[p >> 4], oam));
                o[2 * k + 1] = round_dt<DT>(__fmul_rn(lut[p & 15u], oam));
                x[2 * k] = __fadd_rn(o[2 * k], dd.x);
                x[2 * k + 1] = __fadd_rn(o[2 * k + 1], dd.y);
                am = fmaxf(am, fmaxf(fabsf(x[2 * k]), fabsf(x[2 * k + 1])));
            }
            // Every lane has read the old absmax: the shuffles order it
            // before lane 0's write.
            am = warp_max(am);
            // The non-finite checks read the registers the block already
            // holds, so nothing stays live across the loop (spills).
            if (flags_) {
                u32 bad = nonfinite(round_dt<DT>(am)) << 1;
#pragma unroll
                for (int k = 0; k < FUSE_PAIRS; k++) {
                    if (lane + 32 * k >= npairs) break;
                    bad |= nonfinite(x[2 * k]) | nonfinite(x[2 * k + 1]);
                }
                fuse_flag(flags_, bad);
            }
            if (lane == 0) *pa = am;
            const float inv = nf4_rcp(am);
#pragma unroll
            for (int k = 0; k < FUSE_PAIRS; k++) {
                const int jj = lane + 32 * k;
                if (jj >= npairs) break;
                const u32 q0 = nf4_code(__fmul_rn(x[2 * k], inv)), q1 = nf4_code(__fmul_rn(x[2 * k + 1], inv));
                pb[jj] = (u8)(q0 << 4 | q1);
                if constexpr (STATS) {
                    const vec2 dd = ld2(dx + 2 * jj);
                    fuse_stat(st, round_dt<DT>(__fmul_rn(lut[q0], am)), o[2 * k], dd.x);
                    fuse_stat(st, round_dt<DT>(__fmul_rn(lut[q1], am)), o[2 * k + 1], dd.y);
                }
            }
        }
        if constexpr (PF) {
            // Write the tile back once every warp has re-quantized.
            __syncthreads();
            tile_codes<false>(packed, absmax, pk, oab, in_dim, r0, c0, nr, nc, lg_bs, tb, tab, vec, tid);
        }
    }
    if constexpr (STATS) fuse_stats_flush(stats_, st);
}

// The entry points pick the body compiled for the logical dtype, so the
// per-element rounding carries no dtype branch.
template <bool STATS, bool PF>
__device__ __forceinline__ void fuse2d_dt(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                          u64 a_, u64 b_, i64 rank, i64 tile_cols, i64 dtype, u64 flags_, u64 stats_) {
    if (dtype == 1) fuse2d<STATS, 1, PF>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, flags_, stats_);
    else if (dtype == 2) fuse2d<STATS, 2, PF>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, flags_, stats_);
    else fuse2d<STATS, 0, PF>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, flags_, stats_);
}

// __launch_bounds__(256, 4): 64 registers, four blocks per SM. On an H200
// that took the Flux-dev pass (304 layers, rank 16) from 135 to 100 ms
// plain and from 156 to 128 ms measuring (the direct body, 16×256 tiles),
// though the measuring body then spills a little; three blocks per SM were
// slower (106, 139 ms).
extern "C" __global__ void __launch_bounds__(256, 4) nf4_fuse2d(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                      u64 a_, u64 b_, i64 rank, i64 tile_cols, i64 dtype, u64 flags_) {
    fuse2d_dt<false, true>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, dtype, flags_, 0);
}

extern "C" __global__ void __launch_bounds__(256, 4) nf4_fuse2d_stats(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                            u64 a_, u64 b_, i64 rank, i64 tile_cols, i64 dtype, u64 flags_, u64 stats_) {
    fuse2d_dt<true, true>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, dtype, flags_, stats_);
}

// nf4_fuse2d_direct: nf4_fuse2d without the staged codes (PF false), the
// round-1 body; the GPU check times it beside nf4_fuse2d on the same data
// and requires the same bytes. lora-nf4 never launches it.
extern "C" __global__ void __launch_bounds__(256, 4) nf4_fuse2d_direct(u64 packed_, u64 absmax_, i64 out_dim, i64 in_dim, i64 bs,
                                             u64 a_, u64 b_, i64 rank, i64 tile_cols, i64 dtype, u64 flags_) {
    fuse2d_dt<false, false>(packed_, absmax_, out_dim, in_dim, bs, a_, b_, rank, tile_cols, dtype, flags_, 0);
}

// side_rows: A_cat rows of one LoRA: dst[i] = fp32(src[i]) * scale for i < n
// (src of dtype 0 f32, 1 bf16, 2 f16). A LoRA's A [r × in] is contiguous in
// A_cat [rank × in], so one launch places it.
extern "C" __global__ void side_rows(u64 src_, i64 dtype, i64 n, double scale, u64 dst_) {
    const void* src = (const void*)src_;
    float* dst = (float*)dst_;
    float s = (float)scale;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        dst[i] = __fmul_rn(load_elem(src, i, dtype), s);
}

// side_cols: B_cat columns of one LoRA (build and strength rescale):
// dst[(row0+i)·rank + col + j] = fp32(src[(src_row0+i)·r + j]) · scale for
// i < rows, j < r. src is the LoRA's unscaled B [out × r].
extern "C" __global__ void side_cols(u64 src_, i64 dtype, i64 src_row0, i64 rows, i64 r, double scale,
                                     u64 dst_, i64 row0, i64 rank, i64 col) {
    const void* src = (const void*)src_;
    float* dst = (float*)dst_;
    float s = (float)scale;
    i64 n = rows * r;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / r, j = i - row * r;
        dst[(row0 + row) * rank + col + j] = __fmul_rn(load_elem(src, (src_row0 + row) * r + j, dtype), s);
    }
}
