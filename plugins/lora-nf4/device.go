package main

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/arenahost/arenahost/sdk"
	"github.com/arenahost/arenahost/shared/gpu"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/tensor"
)

// device is what the plugin uses of a GPU driver: the cuda build's
// gpu.Device and the simulated gpusim.Device both provide it.
type device interface {
	gpu.IPCOpener
	MemAlloc(n uint64) (gpu.DevicePtr, error)
	MemFree(p gpu.DevicePtr) error
	// Upload copies src to dst after the stream's pending work and waits.
	Upload(ctx context.Context, dst gpu.DevicePtr, src []byte) error
	// Download copies len(dst) bytes after the stream's pending work.
	Download(dst []byte, src gpu.DevicePtr) error
	CopyAsync(dst, src gpu.DevicePtr, n uint64) error
	Launch(c gpu.Call) error
	Sync() error
	Close() error
}

// openCUDA opens the real driver on a device ordinal; the default build's
// answers that this binary has no CUDA (device_cuda.go, device_nocuda.go).
var openCUDA func(ordinal int) (device, error)

// errNoCUDA is the default build's answer to a real device descriptor.
var errNoCUDA = errors.New("this lora-nf4 was built without CUDA; build it with make cuda")

// openDevice opens the driver a slab's handle belongs to: the simulated
// one for gpusim handles, the real one otherwise.
func openDevice(loc gpu.SlabLocation) (device, bool, error) {
	if isSimHandle(loc.Handle) {
		d, err := openSim(loc.Device)
		return d, true, err
	}
	d, err := openCUDA(loc.Device)
	return d, false, err
}

// gpuState is the plugin's one device and its cache of opened slabs, opened
// on the first CUDA descriptor and closed when the plugin stops.
type gpuState struct {
	mu     sync.Mutex
	dev    device
	sim    bool
	device int // the opened device's ordinal
	slabs  *gpu.SlabCache
	closed bool

	// fuse serialises fused passes: they share the stream's ordering and
	// one scratch allocation each.
	fuse sync.Mutex
	// upload is the fused pass's host buffer for factor uploads (under
	// fuse), kept for the next pass: page-locked when the driver gives it.
	upload     []byte
	freeUpload func() error
}

// pinnedHost allocates n bytes of page-locked host memory on d, which
// uploads read at DMA speed; nil (the default build, and gpusim) means
// plain memory. device_cuda.go sets it.
var pinnedHost func(d device, n int) (buf []byte, free func() error, err error)

// uploadAlign rounds the upload buffer's size: whole scratch slots.
const uploadAlign = 1 << 20

// uploadBuffer returns the fused pass's upload buffer, at least n bytes,
// page-locked when the driver gives it; the caller holds g.fuse.
func (g *gpuState) uploadBuffer(d device, n int) ([]byte, error) {
	if len(g.upload) >= n {
		return g.upload[:n], nil
	}
	if g.freeUpload != nil {
		if err := g.freeUpload(); err != nil {
			return nil, fmt.Errorf("free the upload buffer: %w", err)
		}
	}
	g.upload, g.freeUpload = nil, nil
	size := (n + uploadAlign - 1) / uploadAlign * uploadAlign
	if pinnedHost != nil {
		buf, free, err := pinnedHost(d, size)
		if err != nil {
			return nil, fmt.Errorf("allocate %d bytes of page-locked upload buffer: %w", size, err)
		}
		g.upload, g.freeUpload = buf, free
	} else {
		g.upload = make([]byte, size)
	}
	return g.upload[:n], nil
}

// isCUDA reports whether a region is on a device slab.
func isCUDA(r *pluginv1.Region) bool { return r.GetCuda() != nil }

// open returns the device for a region on a CUDA slab, opening it on first
// use. what names the tensor for errors.
func (g *gpuState) open(what string, r *pluginv1.Region) (device, error) {
	loc, _, err := gpu.RegionAddr(r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", what, err, sdk.ErrInvalidArgument)
	}
	sim := isSimHandle(loc.Handle)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("%s: the plugin is stopping: %w", what, sdk.ErrFailedPrecondition)
	}
	if g.dev != nil {
		if sim != g.sim || loc.Device != g.device {
			return nil, fmt.Errorf("%s: cuda slab %d is on %s device %d but this plugin opened %s device %d (one device per plugin process): %w",
				what, loc.ID, simWord(sim), loc.Device, simWord(g.sim), g.device, sdk.ErrInvalidArgument)
		}
		return g.dev, nil
	}
	d, sim, err := openDevice(loc)
	if err != nil {
		if errors.Is(err, errNoCUDA) {
			return nil, fmt.Errorf("%s is in CUDA device memory but %w (cuda slab %d on device %d): %w", what, err, loc.ID, loc.Device, sdk.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("%s: open device %d: %w: %w", what, loc.Device, err, sdk.ErrFailedPrecondition)
	}
	g.dev, g.sim, g.device, g.slabs = d, sim, loc.Device, gpu.NewSlabCache(d)
	return d, nil
}

func simWord(sim bool) string {
	if sim {
		return "the simulated (gpusim)"
	}
	return "the CUDA"
}

// openAll opens every CUDA slab that the weights ws and their
// quantization tensors lie on (each once: the slab cache keeps them) and
// returns how many slabs the plugin holds open. cuIpcOpenMemHandle took
// about 20 ms a GiB on an H200, 140 ms for a Flux-dev checkpoint, whatever
// the slab size, so the plugin opens a model's slabs before its first
// fused apply needs them: when the host says a model was loaded (prepare)
// and, in the background, during the plan call before every fused apply.
func (g *gpuState) openAll(ws map[string]*pluginv1.TensorDescriptor) (int, error) {
	var regions []*pluginv1.Region
	for _, d := range ws {
		if !isCUDA(d.GetRegion()) {
			continue
		}
		regions = append(regions, d.GetRegion())
		q := d.GetQuant()
		for _, ref := range []*pluginv1.TensorRef{q.GetAbsmax(), q.GetNestedAbsmax(), q.GetNestedQuantMap()} {
			if isCUDA(ref.GetRegion()) {
				regions = append(regions, ref.GetRegion())
			}
		}
	}
	if len(regions) == 0 {
		return 0, nil
	}
	for _, r := range regions {
		if _, err := g.open("weights", r); err != nil {
			return 0, err
		}
		g.mu.Lock()
		sc := g.slabs
		g.mu.Unlock()
		if sc == nil {
			return 0, fmt.Errorf("weights: the plugin is stopping: %w", sdk.ErrFailedPrecondition)
		}
		if _, err := sc.Addr(r); err != nil {
			return 0, fmt.Errorf("weights: %w: %w", err, sdk.ErrInvalidArgument)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.slabs == nil {
		return 0, nil
	}
	return g.slabs.Open(), nil
}

// prefetch is openAll in the background; errors are left to the apply,
// which opens what is still closed and reports them.
func (g *gpuState) prefetch(ws map[string]*pluginv1.TensorDescriptor) {
	go func() { _, _ = g.openAll(ws) }()
}

// addr returns the device address of n bytes at a region on a CUDA slab,
// checking that the region holds them.
func (g *gpuState) addr(what string, r *pluginv1.Region, n uint64) (device, gpu.DevicePtr, error) {
	d, err := g.open(what, r)
	if err != nil {
		return nil, 0, err
	}
	if r.GetLength() < n {
		return nil, 0, fmt.Errorf("%s: region of %d bytes, want %d: %w", what, r.GetLength(), n, sdk.ErrInvalidArgument)
	}
	p, err := g.slabs.Addr(r)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w: %w", what, err, sdk.ErrInvalidArgument)
	}
	return d, p, nil
}

// descAddr is addr for a descriptor (what: "weight X", "tensor X"): its
// nbytes at its region.
func (g *gpuState) descAddr(what string, d *pluginv1.TensorDescriptor) (device, gpu.DevicePtr, error) {
	if err := tensor.Check(d); err != nil {
		return nil, 0, fmt.Errorf("%w: %w", err, sdk.ErrInvalidArgument)
	}
	return g.addr(what, d.GetRegion(), d.GetNbytes())
}

// download copies a descriptor's bytes from the device.
func (g *gpuState) download(what string, d *pluginv1.TensorDescriptor) ([]byte, error) {
	dev, p, err := g.descAddr(what, d)
	if err != nil {
		return nil, err
	}
	b := make([]byte, d.GetNbytes())
	if err := dev.Download(b, p); err != nil {
		return nil, fmt.Errorf("%s: download %d bytes: %w", what, len(b), err)
	}
	return b, nil
}

// Close closes the opened slabs and the device, after the stream's work.
func (g *gpuState) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	if g.dev == nil {
		return nil
	}
	errs := []error{g.dev.Sync(), g.slabs.Close()}
	if g.freeUpload != nil {
		errs = append(errs, g.freeUpload())
	}
	errs = append(errs, g.dev.Close())
	g.dev, g.slabs, g.upload, g.freeUpload = nil, nil, nil, nil
	return errors.Join(errs...)
}

// sync waits for the device's stream, when a device is open: the ordering
// point before descriptors of written device memory go back to the host.
func (g *gpuState) sync() error {
	g.mu.Lock()
	d := g.dev
	g.mu.Unlock()
	if d == nil {
		return nil
	}
	if err := d.Sync(); err != nil {
		return fmt.Errorf("device sync: %w", err)
	}
	return nil
}
