// Package gpu owns what the host and plugins share of the GPU: the device
// address and slab types, the descriptor form of a device slab
// (SlabLocation, RegionAddr) and the per-process cache of opened slabs
// (SlabCache), the NF4 kernels (kernels/kernels.cu, committed as
// kernels.ptx for compute_80 and embedded), every kernel's launch
// parameters and call (DequantizeCall, FuseCall, SideColsCall, …), and,
// with -tags cuda, the driver binding that runs them (Device).
//
// # Build tags
//
// Everything that talks to the driver (gorgonia.org/cu, the cgo IPC shim,
// the kernel launches) is behind the cuda build tag: cu's package init
// calls cuInit and exits the process when no GPU is present, so the default
// build and its tests never import it. What needs no driver is plain Go and
// is tested on every machine: the slab encoding, the launch parameters, the
// embedded PTX and its entry points, and every kernel call: tests run
// kernels.cu on the CPU through kernels/emu (a fiber per CUDA thread, each
// running until it waits at a barrier or a warp shuffle) and compare bit for bit with shared/nf4
// and shared/lora.
//
// With -tags cuda the package adds Device: the primary context made current
// on a dedicated goroutine locked to its OS thread, which runs every driver
// call (Device.Do); cuMemAlloc slabs with their cuIpcGetMemHandle handle;
// pinned staging (Pinned, Upload); the IPC open/close a plugin uses
// (OpenIPC, CloseIPC); and the kernels, loaded from the embedded PTX with
// cuModuleLoadData (Launch, and the typed wrappers of Kernels).
//
// # Ordering
//
// Alloc, Upload and Download return after their work completed. Kernel
// launches and device-to-device copies are only enqueued on the device's
// stream; Sync (cuStreamSynchronize) is the ordering point a caller passes
// before it hands out a descriptor of the results, so a reader in another
// process needs no IPC event.
package gpu
