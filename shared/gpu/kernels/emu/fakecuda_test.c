// fakecuda_test.c: fakecuda refuses what the real driver refuses, so the
// -tags cuda build passing on it means something (make test-cuda-fake runs
// this first). Each case prints a line; a wrong result exits 1.
#include <cuda.h>
#include <pthread.h>
#include <stdio.h>

static int failed;

static void expect(const char* what, CUresult got, CUresult want) {
    printf("fakecuda_test: %-58s %3d (want %d)\n", what, (int)got, (int)want);
    if (got != want) failed = 1;
}

static void* noContext(void* arg) {
    CUdeviceptr p;
    expect("cuMemAlloc on a thread with no current context", cuMemAlloc(&p, 16), CUDA_ERROR_INVALID_CONTEXT);
    return arg;
}

int main(void) {
    CUdevice d;
    CUcontext ctx;
    CUdeviceptr p, q;
    CUipcMemHandle h;
    CUmodule m;
    CUfunction f;
    CUdeviceptr dummy;
    expect("cuMemAlloc before cuInit", cuMemAlloc(&dummy, 16), CUDA_ERROR_NOT_INITIALIZED);
    expect("cuInit", cuInit(0), CUDA_SUCCESS);
    expect("cuDeviceGet 0", cuDeviceGet(&d, 0), CUDA_SUCCESS);
    expect("cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain(&ctx, d), CUDA_SUCCESS);
    expect("cuMemAlloc before cuCtxSetCurrent", cuMemAlloc(&p, 16), CUDA_ERROR_INVALID_CONTEXT);
    expect("cuCtxSetCurrent", cuCtxSetCurrent(ctx), CUDA_SUCCESS);
    expect("cuMemAlloc 100 bytes", cuMemAlloc(&p, 100), CUDA_SUCCESS);
    expect("cuMemsetD8 across the allocation's end", cuMemsetD8(p + 50, 0, 51), CUDA_ERROR_INVALID_VALUE);
    expect("cuMemcpyHtoD to a host address", cuMemcpyHtoD((CUdeviceptr)&d, &d, sizeof d), CUDA_ERROR_INVALID_VALUE);
    expect("cuIpcGetMemHandle inside the allocation", cuIpcGetMemHandle(&h, p + 1), CUDA_ERROR_INVALID_VALUE);
    expect("cuIpcGetMemHandle at its base", cuIpcGetMemHandle(&h, p), CUDA_SUCCESS);
    expect("cuIpcOpenMemHandle of this process's own handle", cuIpcOpenMemHandle(&q, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
           CUDA_ERROR_INVALID_CONTEXT);
    expect("cuModuleLoadData with nf4_fuse taking 1 parameter",
           cuModuleLoadData(&m, ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry nf4_fuse(.param .u64 a)\n{ ret; }\n"),
           CUDA_ERROR_INVALID_PTX);
    expect("cuModuleLoadData for sm_90",
           cuModuleLoadData(&m, ".version 8.0\n.target sm_90\n.address_size 64\n"), CUDA_ERROR_INVALID_PTX);
    expect("cuModuleLoadData with an unknown entry",
           cuModuleLoadData(&m, ".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry other(.param .u64 a)\n{ ret; }\n"),
           CUDA_SUCCESS);
    expect("cuModuleGetFunction of a missing entry", cuModuleGetFunction(&f, m, "nf4_fuse"), CUDA_ERROR_NOT_FOUND);
    expect("cuModuleGetFunction of the unknown entry", cuModuleGetFunction(&f, m, "other"), CUDA_SUCCESS);
    void* args[1] = {&p};
    expect("cuLaunchKernel of a kernel the emulator lacks", cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, 0, args, 0),
           CUDA_ERROR_NOT_SUPPORTED);
    expect("a function fakecuda does not implement", cuCtxGetFlags((unsigned*)&d), CUDA_ERROR_NOT_SUPPORTED);
    pthread_t t;
    pthread_create(&t, 0, noContext, 0);
    pthread_join(t, 0);
    expect("cuMemFree inside the allocation", cuMemFree(p + 8), CUDA_ERROR_INVALID_VALUE);
    expect("cuMemFree", cuMemFree(p), CUDA_SUCCESS);
    expect("cuMemFree twice", cuMemFree(p), CUDA_ERROR_INVALID_VALUE);
    return failed;
}
