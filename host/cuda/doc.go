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
//   - the embedded PTX and its entry points (PTX, Entries), and every
//     kernel call (DequantizeCall, FuseCall, …): tests run kernels.cu on
//     the CPU through kernels/emu (one thread per CUDA thread, real
//     barriers and warp shuffles) and compare bit for bit with shared/nf4
//     and shared/lora;
//   - Stage, the bounded copy through a pinned staging buffer.
//
// With -tags cuda the package adds Device: the primary context made
// current on a dedicated goroutine locked to its OS thread, which runs every
// driver call (Device.Do); the Allocator (cuMemAlloc slabs, zeroed, with
// their cuIpcGetMemHandle handle); the Uploader (pinned staging, Pinned);
// the IPC open/close a plugin uses (OpenIPC, CloseIPC); and the kernels
// (Dequantize, Quantize, NestedDequantize, NestedQuantize, Fuse,
// FuseNested, SideRows, SideCols, JournalCopy), loaded from the embedded
// PTX with cuModuleLoadData.
//
// # Ordering
//
// Allocator and Uploader calls return after their work completed. Kernel
// launches are only enqueued on the device's stream; Device.Sync
// (cuStreamSynchronize) is the ordering point a caller passes before it
// hands out a descriptor of the results, so a reader in another process
// needs no IPC event.
//
// # Wiring (what the rest of the host calls)
//
//   - NewArena(ctx, device, cfg) makes the device arena (RetainEmpty set).
//   - Backend.Opened(owner, segment) whenever a descriptor on a CUDA slab
//     goes to a plugin generation (host/plugin's RegionProto call sites),
//     and Backend.Released(owner) when that generation exits or is swapped
//     out (next to arena.ReleaseOwner): only then can a slab the arena
//     closed be freed.
//   - Loader.Load per tensor for checkpoints loaded onto the device (the
//     registry's Memory.Bytes is nil for device memory), through a pinned
//     buffer of DefaultStagingBytes.
package cuda
