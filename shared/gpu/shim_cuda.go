//go:build cuda

package gpu

/*
#cgo LDFLAGS: -lcuda
#include <cuda.h>
#include <string.h>

static CUresult shim_ipc_get(CUdeviceptr base, unsigned char *out) {
	CUipcMemHandle h;
	CUresult r = cuIpcGetMemHandle(&h, base);
	if (r == CUDA_SUCCESS) memcpy(out, h.reserved, CU_IPC_HANDLE_SIZE);
	return r;
}

static CUresult shim_ipc_open(const unsigned char *in, CUdeviceptr *ptr) {
	CUipcMemHandle h;
	memcpy(h.reserved, in, CU_IPC_HANDLE_SIZE);
	return cuIpcOpenMemHandle(ptr, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
}

static CUresult shim_ipc_close(CUdeviceptr ptr) { return cuIpcCloseMemHandle(ptr); }

static CUresult shim_host_alloc(size_t n, void **p) { return cuMemAllocHost(p, n); }
static CUresult shim_host_free(void *p) { return cuMemFreeHost(p); }

static CUresult shim_error_name(CUresult r, const char **s) { return cuGetErrorName(r, s); }
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// The cgo shim for what gorgonia.org/cu v0.9.6 lacks: legacy IPC handles
// and pinned host memory. Each function must run on the Device's locked
// thread with its context current (Device.Do).

func cuErr(op string, r C.CUresult) error {
	if r == C.CUDA_SUCCESS {
		return nil
	}
	var s *C.char
	name := "unknown"
	if C.shim_error_name(r, &s) == C.CUDA_SUCCESS && s != nil {
		name = C.GoString(s)
	}
	return fmt.Errorf("%s: %s (CUresult %d)", op, name, int(r))
}

// ipcGetMemHandle returns the IPC handle of the allocation whose base is p.
func ipcGetMemHandle(p DevicePtr) ([HandleSize]byte, error) {
	var h [HandleSize]byte
	r := C.shim_ipc_get(C.CUdeviceptr(p), (*C.uchar)(unsafe.Pointer(&h[0])))
	return h, cuErr("cuIpcGetMemHandle", r)
}

// ipcOpenMemHandle maps another process's allocation into this context.
func ipcOpenMemHandle(h [HandleSize]byte) (DevicePtr, error) {
	var p C.CUdeviceptr
	r := C.shim_ipc_open((*C.uchar)(unsafe.Pointer(&h[0])), &p)
	return DevicePtr(p), cuErr("cuIpcOpenMemHandle", r)
}

// ipcCloseMemHandle unmaps an allocation opened with ipcOpenMemHandle.
func ipcCloseMemHandle(p DevicePtr) error {
	return cuErr("cuIpcCloseMemHandle", C.shim_ipc_close(C.CUdeviceptr(p)))
}

// hostAlloc allocates n bytes of page-locked host memory.
func hostAlloc(n int) (unsafe.Pointer, error) {
	var p unsafe.Pointer
	r := C.shim_host_alloc(C.size_t(n), &p)
	return p, cuErr(fmt.Sprintf("cuMemAllocHost %d bytes", n), r)
}

func hostFree(p unsafe.Pointer) error { return cuErr("cuMemFreeHost", C.shim_host_free(p)) }
