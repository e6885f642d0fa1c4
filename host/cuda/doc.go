// Package cuda owns the host's device arena: the arena.Backend whose
// segments are large cuMemAlloc slabs that plugins open by their legacy
// CUDA IPC handle (Backend, NewArena), the per-slab open counts that keep a
// slab allocated while a live plugin generation has it open, the protocol
// form of a slab's arena location (SlabProto, LocationFromSlab), and the
// bounded staging path that loads checkpoints straight into device memory
// (Stage, Loader). The driver binding and the kernels live in shared/gpu,
// which plugins import too; this package is plain Go and is tested on every
// machine with a fake allocator through host/arena/arenatest.
//
// # Wiring (what the rest of the host calls)
//
//   - NewArena(ctx, allocator, cfg) makes the device arena (RetainEmpty set).
//   - Backend.Opened(owner, segment) whenever a descriptor on a CUDA slab
//     goes to a plugin generation, and Backend.Released(owner) when that
//     generation exits or is swapped out (next to arena.ReleaseOwner): only
//     then can a slab the arena closed be freed.
//   - Loader.Load per tensor to stage a reader into a region through a
//     buffer the caller owns (the host cannot map device memory).
//   - Over a Device (an Allocator that is also a Mover: gpu.Device, or
//     gpusim's simulated one), every slab is an arena.Mover and an
//     arena.Filler, so the arena's Read, Write, WriteFrom and Copy work on
//     device regions: downloads, uploads in chunks of DefaultStagingBytes
//     through the backend's staging buffer (pinned in the cuda build,
//     ordinary memory elsewhere), and device-to-device copies followed by
//     a Sync. WriteFrom reads its source straight into the staging buffer,
//     so a checkpoint chunk is copied once on the host (mapping → staging)
//     where Write of a filled buffer copies it twice. The registry loads
//     models with WriteFrom, saves and views them with Read, and the LoRA
//     coordinator journals through them; host/server builds the arena
//     (NewArenaNamed) for `arena-backend: cuda` and `cuda-sim`.
package cuda
