// emu.h: just enough of CUDA to run kernels.cu on the CPU, for tests
// without a GPU (shared/gpu emu_test.go). Every CUDA thread of a block is a
// std::thread; __syncthreads is a block barrier; warp shuffles go through
// per-warp slots and barriers; blocks run one after another, so __shared__
// variables are function statics. Float math is IEEE with no contraction
// (-ffp-contract=off), as the kernels' __fmul_rn/__fadd_rn ask.
#pragma once
#include <algorithm>
#include <barrier>
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
#define __constant__
#define __shared__ static
#define EXTERN_SHARED(type, name) type* name = (type*)emu_dynamic_shared

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
extern thread_local emu_dim3 threadIdx, blockIdx;
extern emu_dim3 blockDim, gridDim;
extern unsigned char* emu_dynamic_shared;
extern std::barrier<>* emu_block_barrier;
extern std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
extern float emu_warp_slots[1024];
extern double emu_warp_dslots[1024];
extern std::mutex emu_atomic_mu;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    unsigned t = threadIdx.x, w = t / 32;
    emu_warp_slots[t] = v;
    emu_warp_barriers[w]->arrive_and_wait();
    float r = emu_warp_slots[(t & ~31u) | ((t & 31u) ^ (unsigned)o)];
    emu_warp_barriers[w]->arrive_and_wait();
    return r;
}

inline double __shfl_xor_sync(unsigned, double v, int o) {
    unsigned t = threadIdx.x, w = t / 32;
    emu_warp_dslots[t] = v;
    emu_warp_barriers[w]->arrive_and_wait();
    double r = emu_warp_dslots[(t & ~31u) | ((t & 31u) ^ (unsigned)o)];
    emu_warp_barriers[w]->arrive_and_wait();
    return r;
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> g(emu_atomic_mu);
    double old = *p;
    *p = old + v;
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
