// emu.h: just enough of CUDA to run kernels.cu on the CPU, for tests
// without a GPU (shared/gpu emu_test.go, and fakecuda.cc). Each CUDA thread
// of a block is a fiber (a ucontext with its own stack) on one OS thread;
// __syncthreads, __syncwarp and the warp shuffles are barriers at which a
// fiber yields to the next until every thread of its block (or warp) has
// arrived; blocks run one after another, so __shared__ variables are
// function statics. A thread runs as far as it can before the next one
// starts, so a missing barrier reads stale shared memory every time rather
// than sometimes. Float math is IEEE with no contraction (-ffp-contract=off),
// as the kernels' __fmul_rn/__fadd_rn ask; __fmaf_rn (the LoRA delta) is an
// exact float32 FMA. emu_run.h runs a launch.
#pragma once
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#define NF4_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __shared__ static
#define EXTERN_SHARED(type, name) type* name = (type*)emu_dynamic_shared

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
// The running fiber's indices: the scheduler sets threadIdx before it
// resumes a fiber.
extern emu_dim3 threadIdx, blockIdx;
extern emu_dim3 blockDim, gridDim;
extern unsigned char* emu_dynamic_shared;
extern float emu_warp_slots[1024];
extern double emu_warp_dslots[1024];
extern std::mutex emu_atomic_mu;

// emu_barrier: n fibers arrive; each but the last yields until the last
// one has arrived.
struct emu_barrier {
    unsigned n = 0, count = 0;
    unsigned long phase = 0;
};
extern emu_barrier emu_block_barrier;
extern emu_barrier emu_warp_barriers[32];
void emu_yield();  // emu_run.h: back to the scheduler, which resumes the next fiber

inline void emu_arrive_and_wait(emu_barrier& b) {
    unsigned long p = b.phase;
    if (++b.count == b.n) {
        b.count = 0;
        b.phase++;
        return;
    }
    while (b.phase == p) emu_yield();
}

inline void __syncthreads() { emu_arrive_and_wait(emu_block_barrier); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned t = threadIdx.x, w = t / 32;
    emu_warp_slots[t] = v;
    emu_arrive_and_wait(emu_warp_barriers[w]);
    float r = emu_warp_slots[(t & ~31u) | ((t & 31u) ^ (unsigned)o)];
    emu_arrive_and_wait(emu_warp_barriers[w]);
    return r;
}

inline double __shfl_xor_sync(unsigned, double v, int o) {
    unsigned t = threadIdx.x, w = t / 32;
    emu_warp_dslots[t] = v;
    emu_arrive_and_wait(emu_warp_barriers[w]);
    double r = emu_warp_dslots[(t & ~31u) | ((t & 31u) ^ (unsigned)o)];
    emu_arrive_and_wait(emu_warp_barriers[w]);
    return r;
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu_arrive_and_wait(emu_warp_barriers[threadIdx.x / 32]); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
// __fmaf_rn: a*b + c rounded once to float32, exactly as the GPU's
// fma.rn.f32 (and shared/simd.FMA32, the same algorithm): the product is
// exact in double; the double sum s rounds to float32 twice wrongly only
// when it is a float32 midpoint (low 28 bits zero), and then the sum is
// rounded to odd instead (TwoSum's error e says on which side the exact
// value lies), which a second rounding to float32 keeps correct. No libm
// fmaf: its exactness would depend on the C library.
inline float __fmaf_rn(float a, float b, float c) {
    double p = (double)a * (double)b, z = (double)c;
    double s = p + z;
    uint64_t u;
    std::memcpy(&u, &s, 8);
    if ((u & ((1ull << 28) - 1)) == 0) {
        double bv = s - p;
        double e = (p - (s - bv)) + (z - bv);
        if (e != 0.0 && e == e) {
            uint64_t ue;
            std::memcpy(&ue, &e, 8);
            u = u + 1 - (((ue ^ u) >> 63) << 1);
            std::memcpy(&s, &u, 8);
        }
    }
    return (float)s;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> g(emu_atomic_mu);
    double old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
    std::lock_guard<std::mutex> g(emu_atomic_mu);
    unsigned old = *p;
    *p = old | v;
    return old;
}
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline unsigned short emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even
    unsigned short u;
    std::memcpy(&u, &h, 2);
    return u;
}
inline float emu_f16_to_f32(unsigned short u) {
    _Float16 h;
    std::memcpy(&h, &u, 2);
    return (float)h;
}
