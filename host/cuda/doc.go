// Package cuda owns the host's GPU side: the device backend of the arena
// (large cuMemAlloc slabs that plugins open by their legacy CUDA IPC
// handle), the NF4 kernels (dequantize, bitsandbytes quantize with nested
// absmax, the fused LoRA merge, side-factor build and rescale) and the
// bounded staging path that loads checkpoints straight into device memory.
//
// # Build tags
//
// Everything that talks to the driver (gorgonia.org/cu, the cgo IPC shim,
// the kernel launches) is behind the cuda build tag: cu's package init
// calls cuInit and exits the process when no GPU is present, so the default
// build and its tests never import it. What needs no driver is plain Go and
// is tested on every machine:
//
//   - Backend: the arena.Backend over an Allocator, with the per-slab open
//     counts that keep a slab allocated while a live plugin generation has
//     it open (a legacy IPC handle does not keep memory alive);
//   - the descriptor encoding of a slab (SlabProto, LocationFromSlab);
//   - every kernel's launch parameters (grid, block, shared memory, tiles);
//   - the embedded PTX and its entry points (PTX, Entries);
//   - Stage, the bounded copy through a pinned staging buffer.
//
// With -tags cuda the package adds Device (a context on a locked OS
// thread), DeviceAllocator (the real Allocator) and Kernels.
//
// # Ordering
//
// Every exported operation of Device and Kernels returns only after the
// stream it used has completed (cuStreamSynchronize), so a descriptor the
// host hands out after such a call names finished bytes: no IPC event is
// needed by a reader.
package cuda
