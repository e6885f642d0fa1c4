// fakecuda.cc: a stand-in for the NVIDIA driver library (libcuda.so.1)
// that runs the -tags cuda build on a machine without a GPU, for tests
// (scripts/fakecuda.sh builds it; `make cuda-fake-check` runs the GPU check
// against it). It implements the part of the driver API that gorgonia.org/cu
// and shared/gpu's shim call, with the driver's rules where they catch
// bugs:
//
//   - every call but cuInit, cuDriverGetVersion and cuGetError* needs
//     cuInit first, and those that act on memory, modules, streams or
//     kernels need a current context on the calling OS thread (the real
//     driver's context is per thread, which is why shared/gpu runs every
//     call on one locked thread);
//   - device memory is separate memfd mappings with an inaccessible page
//     on each side; copies, memsets and frees are checked against them;
//   - IPC handles open only in another process (through /proc/PID/fd), and
//     only at an allocation's base;
//   - cuModuleLoadData parses the PTX's entry points and refuses one whose
//     parameter count differs from kernels.cu's, and launches check the
//     kernel, block size, grid and dynamic shared memory.
//
// Kernels run in the emulator (emu.h, emu_run.h): kernels.cu compiled as
// host C++, one fiber per CUDA thread of a block, blocks in turn. Streams are
// synchronous: each call finishes before it returns. Functions of cuda.h
// that this file does not define return CUDA_ERROR_NOT_SUPPORTED (the
// build script generates them).
#include <cuda.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <string>
#include <thread>

#include "emu.h"

#include "../kernels.cu"
#include "kernels_table.h"
#include "emu_run.h"

namespace {

const char kMagic[8] = {'F', 'A', 'K', 'E', 'C', 'U', 'D', 'A'};
const size_t kPage = 4096;
const unsigned kMaxShared = 48 << 10;

struct Mapping {
    size_t size;
    int fd;       // the memfd (own allocations) or the opened file
    bool opened;  // mapped from another process's IPC handle
    void* guard;  // the reservation with the guard pages
};

struct Module {
    std::map<std::string, size_t> entries;  // name → parameter count
};

struct Function {
    std::string name;
    const Kernel* kernel;
};

std::mutex mu;  // guards everything below
bool inited;
int devices = 1;
size_t total = size_t(16) << 30, used;
std::map<CUdeviceptr, Mapping> mem;  // by base
std::set<void*> pinned;
std::set<Module*> modules;
std::set<Function*> functions;
std::set<CUstream> streams;
int primaryRefs;
// The one device this process emulates: the first whose primary context it
// retains (-1: none yet). Like one host per GPU, a process may use any
// ordinal below FAKECUDA_DEVICES, but only one.
int ctxDevice = -1;
int ctxObject;
const CUcontext primary = reinterpret_cast<CUcontext>(&ctxObject);
thread_local CUcontext current;
std::mutex launchMu;  // one kernel at a time: the emulator's globals

void fail(const char* fn, const std::string& why) { std::fprintf(stderr, "fakecuda: %s: %s\n", fn, why.c_str()); }

CUresult needInit() { return inited ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED; }

CUresult needContext(const char* fn) {
    if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
    if (current != primary) {
        fail(fn, "no current context on this thread (the driver's context is per OS thread)");
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    return CUDA_SUCCESS;
}

// within finds the mapping holding [p, p+n); mu must be held.
const Mapping* within(CUdeviceptr p, size_t n) {
    auto it = mem.upper_bound(p);
    if (it == mem.begin()) return nullptr;
    --it;
    if (p + n < p || p + n > it->first + it->second.size) return nullptr;
    return &it->second;
}

// mapGuarded maps fd's first size bytes between two inaccessible pages.
void* mapGuarded(int fd, size_t size) {
    size_t span = (size + kPage - 1) / kPage * kPage;
    void* g = mmap(nullptr, span + 2 * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED) return nullptr;
    void* p = mmap((char*)g + kPage, span, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
        munmap(g, span + 2 * kPage);
        return nullptr;
    }
    return g;
}

void unmapGuarded(const Mapping& m) {
    size_t span = (m.size + kPage - 1) / kPage * kPage;
    munmap(m.guard, span + 2 * kPage);
    close(m.fd);
}

CUresult copyChecked(const char* fn, void* dst, bool dstDev, const void* src, bool srcDev, size_t n) {
    if (CUresult r = needContext(fn)) return r;
    if (n == 0) return CUDA_SUCCESS;
    {
        std::lock_guard<std::mutex> g(mu);
        if (dstDev && !within((CUdeviceptr)dst, n)) {
            fail(fn, "destination is not inside one device allocation");
            return CUDA_ERROR_INVALID_VALUE;
        }
        if (srcDev && !within((CUdeviceptr)src, n)) {
            fail(fn, "source is not inside one device allocation");
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (!dst || !src) return CUDA_ERROR_INVALID_VALUE;
    std::memmove(dst, src, n);
    return CUDA_SUCCESS;
}

CUresult checkStream(const char* fn, CUstream s) {
    std::lock_guard<std::mutex> g(mu);
    if (s != nullptr && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD && !streams.count(s)) {
        fail(fn, "unknown stream");
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return CUDA_SUCCESS;
}

// runGrid runs a launch in the emulator, one at a time (its state is
// global).
bool runGrid(const std::string& name, const Kernel& k, const Args& a, unsigned grid, unsigned block, unsigned shared) {
    std::lock_guard<std::mutex> g(launchMu);
    if (std::string err = emu_run_grid(k, a, grid, block, shared); !err.empty()) {
        fail("cuLaunchKernel", name + ": " + err);
        return false;
    }
    return true;
}

}  // namespace

extern "C" {

CUresult CUDAAPI cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(mu);
    if (const char* s = std::getenv("FAKECUDA_DEVICES")) devices = std::atoi(s);
    if (const char* s = std::getenv("FAKECUDA_MEMORY_MIB")) total = size_t(std::atoll(s)) << 20;
    if (devices <= 0) return CUDA_ERROR_NO_DEVICE;
    inited = true;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = CUDA_VERSION;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorName(CUresult r, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    switch (r) {
#define NAME(x) \
    case x: *s = #x; return CUDA_SUCCESS;
        NAME(CUDA_SUCCESS) NAME(CUDA_ERROR_INVALID_VALUE) NAME(CUDA_ERROR_OUT_OF_MEMORY) NAME(CUDA_ERROR_NOT_INITIALIZED)
        NAME(CUDA_ERROR_NO_DEVICE) NAME(CUDA_ERROR_INVALID_DEVICE) NAME(CUDA_ERROR_INVALID_PTX) NAME(CUDA_ERROR_INVALID_CONTEXT)
        NAME(CUDA_ERROR_INVALID_HANDLE) NAME(CUDA_ERROR_NOT_FOUND) NAME(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)
        NAME(CUDA_ERROR_LAUNCH_FAILED) NAME(CUDA_ERROR_NOT_SUPPORTED) NAME(CUDA_ERROR_INVALID_IMAGE)
        NAME(CUDA_ERROR_ALREADY_MAPPED) NAME(CUDA_ERROR_UNKNOWN)
#undef NAME
    default:
        *s = nullptr;
        return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult CUDAAPI cuGetErrorString(CUresult r, const char** s) { return cuGetErrorName(r, s); }

CUresult CUDAAPI cuDeviceGetCount(int* n) {
    if (CUresult r = needInit()) return r;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = devices;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice* d, int ordinal) {
    if (CUresult r = needInit()) return r;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    // FAKECUDA_DEVICES ordinals exist; a process emulates one of them
    // (cuDevicePrimaryCtxRetain), so two hosts may run on devices 0 and 1.
    if (ordinal < 0 || ordinal >= devices) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetName(char* name, int len, CUdevice d) {
    if (CUresult r = needInit()) return r;
    if (d < 0 || d >= devices) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, len, "fakecuda (kernels.cu emulated on the CPU)");
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceTotalMem(size_t* bytes, CUdevice d) {
    if (CUresult r = needInit()) return r;
    if (d < 0 || d >= devices) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = total;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    if (CUresult r = needInit()) return r;
    if (d < 0 || d >= devices) return CUDA_ERROR_INVALID_DEVICE;
    switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 8; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 2; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = kMaxShared; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
    default: return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (CUresult r = needInit()) return r;
    if (d < 0 || d >= devices) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(mu);
    if (ctxDevice >= 0 && d != ctxDevice) {
        fail("cuDevicePrimaryCtxRetain", "fakecuda emulates one device per process; this one uses device " +
                                             std::to_string(ctxDevice) + ", not " + std::to_string(d));
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    ctxDevice = d;
    primaryRefs++;
    *c = primary;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice d) {
    if (CUresult r = needInit()) return r;
    if (d < 0 || d >= devices) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(mu);
    if (primaryRefs == 0 || d != ctxDevice) return CUDA_ERROR_INVALID_CONTEXT;
    primaryRefs--;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) {
    if (CUresult r = needInit()) return r;
    if (c != nullptr && c != primary) return CUDA_ERROR_INVALID_CONTEXT;
    std::lock_guard<std::mutex> g(mu);
    if (c == primary && primaryRefs == 0) return CUDA_ERROR_INVALID_CONTEXT;  // released
    current = c;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext* c) {
    if (CUresult r = needInit()) return r;
    *c = current;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetDevice(CUdevice* d) {
    if (CUresult r = needContext("cuCtxGetDevice")) return r;
    *d = ctxDevice;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSynchronize(void) { return needContext("cuCtxSynchronize"); }

CUresult CUDAAPI cuStreamCreate(CUstream* s, unsigned int flags) {
    if (CUresult r = needContext("cuStreamCreate")) return r;
    if (!s || (flags & ~CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(mu);
    *s = reinterpret_cast<CUstream>(new char);
    streams.insert(*s);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamDestroy(CUstream s) {
    if (CUresult r = needContext("cuStreamDestroy")) return r;
    std::lock_guard<std::mutex> g(mu);
    if (!streams.erase(s)) return CUDA_ERROR_INVALID_HANDLE;
    delete reinterpret_cast<char*>(s);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamSynchronize(CUstream s) {
    if (CUresult r = needContext("cuStreamSynchronize")) return r;
    return checkStream("cuStreamSynchronize", s);
}

CUresult CUDAAPI cuStreamQuery(CUstream s) {
    if (CUresult r = needContext("cuStreamQuery")) return r;
    return checkStream("cuStreamQuery", s);
}

CUresult CUDAAPI cuMemGetInfo(size_t* free, size_t* tot) {
    if (CUresult r = needContext("cuMemGetInfo")) return r;
    std::lock_guard<std::mutex> g(mu);
    *free = total - used;
    *tot = total;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAlloc(CUdeviceptr* p, size_t n) {
    if (CUresult r = needContext("cuMemAlloc")) return r;
    if (!p || n == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(mu);
    if (n > total - used) return CUDA_ERROR_OUT_OF_MEMORY;
    int fd = memfd_create("fakecuda", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)((n + kPage - 1) / kPage * kPage)) != 0) {
        if (fd >= 0) close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void* gmap = mapGuarded(fd, n);
    if (!gmap) {
        close(fd);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    CUdeviceptr base = (CUdeviceptr)((char*)gmap + kPage);
    mem[base] = Mapping{n, fd, false, gmap};
    used += n;
    *p = base;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemFree(CUdeviceptr p) {
    if (CUresult r = needContext("cuMemFree")) return r;
    std::lock_guard<std::mutex> g(mu);
    auto it = mem.find(p);
    if (it == mem.end() || it->second.opened) {
        fail("cuMemFree", "not the base of a device allocation of this process");
        return CUDA_ERROR_INVALID_VALUE;
    }
    used -= it->second.size;
    unmapGuarded(it->second);
    mem.erase(it);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAllocHost(void** p, size_t n) {
    if (CUresult r = needContext("cuMemAllocHost")) return r;
    if (!p || n == 0) return CUDA_ERROR_INVALID_VALUE;
    void* m = nullptr;
    if (posix_memalign(&m, kPage, n) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(mu);
    pinned.insert(m);
    *p = m;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemFreeHost(void* p) {
    if (CUresult r = needContext("cuMemFreeHost")) return r;
    std::lock_guard<std::mutex> g(mu);
    if (!pinned.erase(p)) {
        fail("cuMemFreeHost", "not page-locked memory from cuMemAllocHost");
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::free(p);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemsetD8(CUdeviceptr p, unsigned char v, size_t n) {
    if (CUresult r = needContext("cuMemsetD8")) return r;
    {
        std::lock_guard<std::mutex> g(mu);
        if (n > 0 && !within(p, n)) {
            fail("cuMemsetD8", "range is not inside one device allocation");
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    std::memset((void*)p, v, n);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    if (CUresult r = checkStream("cuMemsetD8Async", s)) return r;
    return cuMemsetD8(p, v, n);
}

CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
    return copyChecked("cuMemcpyHtoD", (void*)dst, true, src, false, n);
}

CUresult CUDAAPI cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    if (CUresult r = checkStream("cuMemcpyHtoDAsync", s)) return r;
    return copyChecked("cuMemcpyHtoDAsync", (void*)dst, true, src, false, n);
}

CUresult CUDAAPI cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
    return copyChecked("cuMemcpyDtoH", dst, false, (const void*)src, true, n);
}

CUresult CUDAAPI cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    if (CUresult r = checkStream("cuMemcpyDtoHAsync", s)) return r;
    return copyChecked("cuMemcpyDtoHAsync", dst, false, (const void*)src, true, n);
}

CUresult CUDAAPI cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copyChecked("cuMemcpyDtoD", (void*)dst, true, (const void*)src, true, n);
}

CUresult CUDAAPI cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    if (CUresult r = checkStream("cuMemcpyDtoDAsync", s)) return r;
    return copyChecked("cuMemcpyDtoDAsync", (void*)dst, true, (const void*)src, true, n);
}

// The handle: the magic, the owner's pid, its memfd and the size.
CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle* h, CUdeviceptr p) {
    if (CUresult r = needContext("cuIpcGetMemHandle")) return r;
    std::lock_guard<std::mutex> g(mu);
    auto it = mem.find(p);
    if (it == mem.end() || it->second.opened) {
        fail("cuIpcGetMemHandle", "not the base of a device allocation of this process");
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::memset(h->reserved, 0, sizeof h->reserved);
    int32_t pid = getpid(), fd = it->second.fd;
    uint64_t size = it->second.size;
    std::memcpy(h->reserved, kMagic, 8);
    std::memcpy(h->reserved + 8, &pid, 4);
    std::memcpy(h->reserved + 12, &fd, 4);
    std::memcpy(h->reserved + 16, &size, 8);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr* p, CUipcMemHandle h, unsigned int flags) {
    if (CUresult r = needContext("cuIpcOpenMemHandle")) return r;
    if (!p || (flags & ~CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)) return CUDA_ERROR_INVALID_VALUE;
    if (std::memcmp(h.reserved, kMagic, 8) != 0) {
        fail("cuIpcOpenMemHandle", "not a fakecuda IPC handle");
        return CUDA_ERROR_INVALID_VALUE;
    }
    int32_t pid, fd;
    uint64_t size;
    std::memcpy(&pid, h.reserved + 8, 4);
    std::memcpy(&fd, h.reserved + 12, 4);
    std::memcpy(&size, h.reserved + 16, 8);
    if (pid == getpid()) {
        fail("cuIpcOpenMemHandle", "a process cannot open its own IPC handles");
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    int f = open(path.c_str(), O_RDWR | O_CLOEXEC);
    struct stat st;
    if (f < 0 || fstat(f, &st) != 0 || (uint64_t)st.st_size < size) {
        if (f >= 0) close(f);
        fail("cuIpcOpenMemHandle", "open " + path + ": the allocation is gone");
        return CUDA_ERROR_INVALID_VALUE;
    }
    void* gmap = mapGuarded(f, size);
    if (!gmap) {
        close(f);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    std::lock_guard<std::mutex> g(mu);
    CUdeviceptr base = (CUdeviceptr)((char*)gmap + kPage);
    mem[base] = Mapping{size, f, true, gmap};
    *p = base;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuIpcCloseMemHandle(CUdeviceptr p) {
    if (CUresult r = needContext("cuIpcCloseMemHandle")) return r;
    std::lock_guard<std::mutex> g(mu);
    auto it = mem.find(p);
    if (it == mem.end() || !it->second.opened) {
        fail("cuIpcCloseMemHandle", "not an allocation opened with cuIpcOpenMemHandle");
        return CUDA_ERROR_INVALID_VALUE;
    }
    unmapGuarded(it->second);
    mem.erase(it);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleLoadData(CUmodule* m, const void* image) {
    if (CUresult r = needContext("cuModuleLoadData")) return r;
    if (!m || !image) return CUDA_ERROR_INVALID_VALUE;
    std::string ptx((const char*)image);
    if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) {
        fail("cuModuleLoadData", "not PTX text");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    std::smatch t;
    if (std::regex_search(ptx, t, std::regex(R"(\.target\s+sm_(\d+))")) && std::stoi(t[1]) > 80) {
        fail("cuModuleLoadData", "PTX targets sm_" + t[1].str() + ", newer than the emulated compute 8.0");
        return CUDA_ERROR_INVALID_PTX;
    }
    auto mod = new Module;
    std::regex entry(R"(\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\))");
    for (std::sregex_iterator it(ptx.begin(), ptx.end(), entry), e; it != e; ++it) {
        std::string params = (*it)[2];
        size_t n = 0;
        for (size_t pos = 0; (pos = params.find(".param", pos)) != std::string::npos; pos += 6) n++;
        std::string name = (*it)[1];
        auto k = kernels.find(name);
        if (k != kernels.end() && k->second.params != n) {
            fail("cuModuleLoadData", "entry " + name + " takes " + std::to_string(n) + " parameters in the PTX, " +
                                         std::to_string(k->second.params) + " in kernels.cu");
            delete mod;
            return CUDA_ERROR_INVALID_PTX;
        }
        mod->entries[name] = n;
    }
    std::lock_guard<std::mutex> g(mu);
    modules.insert(mod);
    *m = reinterpret_cast<CUmodule>(mod);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleUnload(CUmodule m) {
    if (CUresult r = needContext("cuModuleUnload")) return r;
    std::lock_guard<std::mutex> g(mu);
    auto mod = reinterpret_cast<Module*>(m);
    if (!modules.erase(mod)) return CUDA_ERROR_INVALID_HANDLE;
    delete mod;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (CUresult r = needContext("cuModuleGetFunction")) return r;
    std::lock_guard<std::mutex> g(mu);
    auto mod = reinterpret_cast<Module*>(m);
    if (!modules.count(mod)) return CUDA_ERROR_INVALID_HANDLE;
    if (!mod->entries.count(name)) return CUDA_ERROR_NOT_FOUND;
    auto k = kernels.find(name);
    auto fn = new Function{name, k == kernels.end() ? nullptr : &k->second};
    functions.insert(fn);
    *f = reinterpret_cast<CUfunction>(fn);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by,
                                unsigned int bz, unsigned int shared, CUstream s, void** params, void** extra) {
    if (CUresult r = needContext("cuLaunchKernel")) return r;
    if (CUresult r = checkStream("cuLaunchKernel", s)) return r;
    Function* fn;
    {
        std::lock_guard<std::mutex> g(mu);
        fn = reinterpret_cast<Function*>(f);
        if (!functions.count(fn)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!fn->kernel) {
        fail("cuLaunchKernel", fn->name + " is not one of kernels.cu's entry points");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (extra != nullptr || params == nullptr) {
        fail("cuLaunchKernel", fn->name + ": parameters must come as kernelParams");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (gx == 0 || gx > 0x7fffffffu || gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024 || bx % 32 != 0) {
        fail("cuLaunchKernel", fn->name + ": grid " + std::to_string(gx) + "x" + std::to_string(gy) + "x" + std::to_string(gz) +
                                   ", block " + std::to_string(bx) + "x" + std::to_string(by) + "x" + std::to_string(bz) +
                                   " (the kernels are 1-D, blocks of whole warps)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (shared > kMaxShared) {
        fail("cuLaunchKernel", fn->name + ": " + std::to_string(shared) + " bytes of dynamic shared memory");
        return CUDA_ERROR_INVALID_VALUE;
    }
    Args a(fn->kernel->params);
    for (size_t i = 0; i < a.size(); i++) {
        if (!params[i]) return CUDA_ERROR_INVALID_VALUE;
        std::memcpy(&a[i], params[i], 8);  // every parameter of kernels.cu is 8 bytes
    }
    if (!runGrid(fn->name, *fn->kernel, a, gx, bx, shared)) return CUDA_ERROR_LAUNCH_FAILED;
    return CUDA_SUCCESS;
}

}  // extern "C"
