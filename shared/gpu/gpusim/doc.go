// Package gpusim owns a simulated GPU: a Device with the method set and
// ordering of the cuda build's gpu.Device (Alloc, Free, OpenIPC, CloseIPC,
// MemAlloc, Upload, Download, CopyAsync, Launch, Zero, Sync, MemInfo,
// Close), so the whole device path (the host's device arena, descriptors
// handed to plugin processes, kernel launches) runs and is tested on
// machines without a GPU. It is for development and tests only; the host
// selects it with `arena.backend: cuda-sim`.
//
// # Memory
//
// Device memory is host shared memory. A slab (Alloc) is a memfd
// ("arenahost-sim-<n>") mapped MAP_SHARED; its DevicePtr is the mapping's
// virtual address. Its 64-byte IPC handle is
//
//	"ARENASIM" | u32 version=1 | u32 pid | u32 fd | u32 reserved=0 | u64 size | zeros
//
// (little-endian), and OpenIPC in another process maps /proc/<pid>/fd/<fd>,
// so a plugin reads and writes the very pages the host allocated. Like the
// driver, a handle is opened at most once per process (gpu.SlabCache
// caches it) and never in the process that allocated it. Scratch memory
// (MemAlloc) is an anonymous mapping. Every address a kernel, copy or
// transfer touches is checked against the live mappings: an address out
// of range, or in memory already freed, is an error naming the kernel and
// argument, never a fault.
//
// # Ordering
//
// Like a CUDA stream: Alloc, Upload and Download return after their work
// completed; Launch, CopyAsync and Zero are queued and run in order, on the
// calling goroutine, at the next Sync, Upload, Download, Free, MemFree,
// CloseIPC or Close. Code that hands a descriptor to another process
// without a Sync is therefore caught: the other process sees the old bytes.
//
// # Kernels
//
// Launch runs the kernels of gpu.Entries by name with kernels.cu's
// argument order and meaning, computed in Go with the CPU references the
// kernels are proven bit-equal to (shared/nf4, shared/lora): results are
// the bytes the GPU writes, except absmax_sum, whose float64 sum order
// differs from the GPU's atomics in the last bits. The launch geometry is
// only sanity-checked.
package gpusim
