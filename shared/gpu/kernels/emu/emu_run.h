// emu_run.h: runs one launch of a kernels.cu entry point in the emulator
// (emu.h): each CUDA thread of a block is a fiber with its own stack, all on
// the calling OS thread; the fibers of a block are resumed in turn, each
// until it waits at a barrier or returns, and blocks run one after another.
// Include it once per program, after emu.h, kernels.cu and kernels_table.h
// (it defines emu.h's globals).
#pragma once
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <string>

emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
unsigned char* emu_dynamic_shared;
float emu_warp_slots[1024];
double emu_warp_dslots[1024];
std::mutex emu_atomic_mu;
emu_barrier emu_block_barrier;
emu_barrier emu_warp_barriers[32];

namespace emu_run {

const size_t kStack = 256 << 10;  // each fiber's stack

void entry(int t);

#if defined(__x86_64__)
// The switch: a fiber switch happens at every barrier of every thread, so
// it must not make system calls, as swapcontext does (it saves and
// restores the signal mask). emu_switch pushes the callee-saved registers
// and the SSE/x87 control words on the current stack, stores the stack
// pointer in *from, loads to and pops the same from there (SysV x86-64).
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_start
    .type emu_start, @function
emu_start:
    movq %r12, %rdi
    callq *%rbx
    ud2
    .size emu_start, .-emu_start
)");
extern "C" void emu_start();

struct Context {
    void* sp = nullptr;
};

inline void switchTo(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }

// prepare makes c start entry(t) on the stack [stack, stack+size): the
// frame emu_switch pops, returning into emu_start with t in r12 and entry
// in rbx.
inline void prepare(Context& c, void* stack, size_t size, int t) {
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = (uint64_t)(uintptr_t)&emu_start;      // ret: leaves rsp = top, 16-aligned for its call
    *--sp = 0;                                    // rbp
    *--sp = (uint64_t)(uintptr_t)&entry;          // rbx
    *--sp = (uint64_t)(unsigned)t;                // r12
    *--sp = 0;                                    // r13
    *--sp = 0;                                    // r14
    *--sp = 0;                                    // r15
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    --sp;
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy((char*)sp + 4, &fpucw, 2);
    c.sp = sp;
}
#else
// Elsewhere, ucontext (correct, slower: a system call per switch).
struct Context {
    ucontext_t uc;
};

inline void switchTo(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void prepare(Context& c, void* stack, size_t size, int t) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;  // entry never returns
    makecontext(&c.uc, (void (*)())entry, 1, t);
}
#endif

struct Fiber {
    Context ctx;
    bool done;
};

Context scheduler;
std::vector<Fiber> fibers;
std::vector<void*> stacks;  // reused from launch to launch
unsigned current;
const Kernel* kernel;
const Args* args;
emu_barrier blockEnd;  // every thread of a block has returned from the kernel

// entry is one CUDA thread for the whole grid: it runs the kernel for
// each block in turn; the last thread to finish a block moves blockIdx on
// and resets the barriers for the next. It ends by switching back to the
// scheduler for good.
void entry(int t) {
    for (unsigned b = 0; b < gridDim.x; b++) {
        kernel->run(*args);
        unsigned long p = blockEnd.phase;
        if (++blockEnd.count == blockEnd.n) {
            blockEnd.count = 0;
            blockIdx.x = b + 1;
            emu_block_barrier.count = 0;
            for (unsigned w = 0; w < blockDim.x / 32; w++) emu_warp_barriers[w].count = 0;
            blockEnd.phase++;
        } else {
            while (blockEnd.phase == p) emu_yield();
        }
    }
    fibers[t].done = true;
    switchTo(fibers[t].ctx, scheduler);
    __builtin_unreachable();
}

}  // namespace emu_run

void emu_yield() { emu_run::switchTo(emu_run::fibers[emu_run::current].ctx, emu_run::scheduler); }

// emu_run_grid runs k over grid blocks of block threads with shared bytes
// of dynamic shared memory (and a guard zone after them, which must stay
// untouched). It returns an empty string, or what went wrong.
inline std::string emu_run_grid(const Kernel& k, const Args& a, unsigned grid, unsigned block, unsigned shared) {
    using namespace emu_run;
    if (block == 0 || block > 1024 || block % 32 != 0) return "block of " + std::to_string(block) + " threads";
    const size_t guard = 4096;
    std::vector<unsigned char> dyn(shared + guard, 0xAB);
    emu_dynamic_shared = dyn.data();
    blockDim.x = block;
    gridDim.x = grid;
    kernel = &k;
    args = &a;
    while (stacks.size() < block) {
        void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (s == MAP_FAILED) return "mmap a fiber stack";
        stacks.push_back(s);
    }
    fibers.assign(block, Fiber{});
    blockIdx.x = 0;
    emu_block_barrier = emu_barrier{block};
    for (unsigned w = 0; w < block / 32; w++) emu_warp_barriers[w] = emu_barrier{32};
    blockEnd = emu_barrier{block};
    for (unsigned t = 0; t < block; t++) prepare(fibers[t].ctx, stacks[t], kStack, (int)t);
    // Resume the fibers in turn until all have returned. A pass in which
    // no barrier opened and no fiber returned means the fibers left wait at
    // a barrier others returned without reaching: on a GPU, a hang.
    auto progress = [&] {
        unsigned long p = emu_block_barrier.phase + blockEnd.phase;
        for (unsigned w = 0; w < block / 32; w++) p += emu_warp_barriers[w].phase;
        return p;
    };
    for (unsigned left = block; left > 0;) {
        unsigned long before = progress();
        unsigned was = left;
        left = 0;
        for (unsigned t = 0; t < block; t++) {
            if (fibers[t].done) continue;
            current = t;
            threadIdx.x = t;
            switchTo(scheduler, fibers[t].ctx);
            left += !fibers[t].done;
        }
        if (left > 0 && left == was && progress() == before)
            return "block " + std::to_string(blockIdx.x) + ": its " + std::to_string(block) +
                   " threads wait at barriers that cannot open (a thread returned from the kernel without reaching one)";
    }
    for (size_t i = shared; i < shared + guard; i++) {
        if (dyn[i] != 0xAB) return "wrote shared memory byte " + std::to_string(i) + " past its " + std::to_string(shared) + " bytes";
    }
    return "";
}
