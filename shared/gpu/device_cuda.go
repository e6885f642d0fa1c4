//go:build cuda

package gpu

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"gorgonia.org/cu"
)

// Device is one GPU as the host uses it: its primary context (the one
// torch and cupy use, so the host and in-process libraries share it),
// made current on a dedicated goroutine locked to its OS thread that runs
// every driver call, one stream, and the kernels' module (PTX loaded with
// cuModuleLoadData). It implements Allocator (cuMemAlloc slabs with their
// IPC handles) and Uploader.
type Device struct {
	Kernels
	ordinal int
	work    chan func()
	quit    chan struct{}
	wg      sync.WaitGroup

	// Owned by the locked goroutine.
	ctx    cu.CUContext
	stream cu.Stream
	mod    cu.Module
	fns    map[string]cu.Function

	closeOnce sync.Once
	closeErr  error
}

// Open starts the device's thread, retains the primary context, makes the
// stream and loads the kernels.
func Open(ordinal int) (*Device, error) {
	n, err := cu.NumDevices()
	if err != nil {
		return nil, fmt.Errorf("open device %d: %w", ordinal, err)
	}
	if ordinal < 0 || ordinal >= n {
		return nil, fmt.Errorf("open device %d: %d devices present", ordinal, n)
	}
	d := &Device{ordinal: ordinal, work: make(chan func()), quit: make(chan struct{}), fns: map[string]cu.Function{}}
	d.Kernels = Kernels{l: d}
	ready := make(chan error, 1)
	d.wg.Add(1)
	go d.run(ready)
	if err := <-ready; err != nil {
		d.wg.Wait()
		return nil, fmt.Errorf("open device %d: %w", ordinal, err)
	}
	return d, nil
}

func (d *Device) run(ready chan<- error) {
	defer d.wg.Done()
	// The thread stays locked until the goroutine exits, which ends the
	// thread too: no other goroutine ever runs with this context current.
	runtime.LockOSThread()
	if err := d.setup(); err != nil {
		ready <- err
		return
	}
	ready <- nil
	for {
		select {
		case fn := <-d.work:
			fn()
		case <-d.quit:
			return
		}
	}
}

func (d *Device) setup() error {
	dev, err := cu.GetDevice(d.ordinal)
	if err != nil {
		return fmt.Errorf("get device: %w", err)
	}
	ctx, err := dev.RetainPrimaryCtx()
	if err != nil {
		return fmt.Errorf("retain primary context: %w", err)
	}
	if err := cu.SetCurrentContext(ctx); err != nil {
		return fmt.Errorf("set current context: %w", err)
	}
	d.ctx = ctx
	if d.stream, err = cu.MakeStream(cu.NonBlocking); err != nil {
		return fmt.Errorf("make stream: %w", err)
	}
	if d.mod, err = cu.LoadData(PTX); err != nil {
		return fmt.Errorf("load kernels (PTX for compute_80): %w", err)
	}
	for name := range Entries {
		fn, err := d.mod.Function(name)
		if err != nil {
			return fmt.Errorf("kernel %s: %w", name, err)
		}
		d.fns[name] = fn
	}
	return nil
}

// Do runs fn on the device's locked thread with its context current and
// waits for it.
func (d *Device) Do(fn func() error) error {
	errc := make(chan error, 1)
	select {
	case d.work <- func() { errc <- fn() }:
	case <-d.quit:
		return fmt.Errorf("device %d: closed", d.ordinal)
	}
	return <-errc
}

// Close synchronizes, unloads the kernels and releases the primary
// context. Slabs must be freed first (the arena's Close does it).
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.closeErr = d.Do(func() error {
			var errs []error
			if err := d.stream.Synchronize(); err != nil {
				errs = append(errs, fmt.Errorf("synchronize: %w", err))
			}
			if err := d.mod.Unload(); err != nil {
				errs = append(errs, fmt.Errorf("unload kernels: %w", err))
			}
			if err := d.stream.Destroy(); err != nil {
				errs = append(errs, fmt.Errorf("destroy stream: %w", err))
			}
			dev, _ := cu.GetDevice(d.ordinal)
			if err := dev.ReleasePrimaryCtx(); err != nil {
				errs = append(errs, fmt.Errorf("release primary context: %w", err))
			}
			return errors.Join(errs...)
		})
		close(d.quit)
		d.wg.Wait()
		if d.closeErr != nil {
			d.closeErr = fmt.Errorf("close device %d: %w", d.ordinal, d.closeErr)
		}
	})
	return d.closeErr
}

// Device is the ordinal.
func (d *Device) Device() int { return d.ordinal }

// Alloc allocates a zeroed slab and its IPC handle (Allocator). The zeroing
// has completed when Alloc returns.
func (d *Device) Alloc(size uint64) (Slab, error) {
	var s Slab
	err := d.Do(func() error {
		p, err := cu.MemAlloc(int64(size))
		if err != nil {
			return fmt.Errorf("cuMemAlloc %d bytes: %w", size, err)
		}
		fail := func(err error) error {
			_ = cu.MemFree(p)
			return err
		}
		if err := cu.MemsetD8Async(p, 0, int64(size), d.stream); err != nil {
			return fail(fmt.Errorf("zero slab: %w", err))
		}
		if err := d.stream.Synchronize(); err != nil {
			return fail(fmt.Errorf("zero slab: synchronize: %w", err))
		}
		h, err := ipcGetMemHandle(DevicePtr(p))
		if err != nil {
			return fail(err)
		}
		s = Slab{Ptr: DevicePtr(p), Size: size, Handle: h}
		return nil
	})
	return s, err
}

// Free releases a slab (Allocator). Pending work on the stream finishes
// first.
func (d *Device) Free(s Slab) error {
	return d.Do(func() error {
		if err := d.stream.Synchronize(); err != nil {
			return fmt.Errorf("synchronize before free: %w", err)
		}
		if err := cu.MemFree(cu.DevicePtr(s.Ptr)); err != nil {
			return fmt.Errorf("cuMemFree %#x: %w", s.Ptr, err)
		}
		return nil
	})
}

// MemAlloc allocates n bytes of device memory outside any arena (scratch
// for the host's own kernels and the GPU check's workloads).
func (d *Device) MemAlloc(n uint64) (DevicePtr, error) {
	var p cu.DevicePtr
	err := d.Do(func() (err error) {
		p, err = cu.MemAlloc(int64(n))
		if err != nil {
			return fmt.Errorf("cuMemAlloc %d bytes: %w", n, err)
		}
		return nil
	})
	return DevicePtr(p), err
}

// MemFree frees memory from MemAlloc.
func (d *Device) MemFree(p DevicePtr) error {
	return d.Do(func() error {
		if err := d.stream.Synchronize(); err != nil {
			return err
		}
		return cu.MemFree(cu.DevicePtr(p))
	})
}

// MemInfo returns the device's free and total memory.
func (d *Device) MemInfo() (free, total uint64, err error) {
	err = d.Do(func() error {
		f, t, err := cu.MemInfo()
		free, total = uint64(f), uint64(t)
		return err
	})
	return free, total, err
}

// PinnedBuffer is page-locked host memory for staging uploads.
type PinnedBuffer struct {
	d   *Device
	p   unsafe.Pointer
	buf []byte
}

// Bytes is the buffer.
func (b *PinnedBuffer) Bytes() []byte { return b.buf }

// Close frees the buffer.
func (b *PinnedBuffer) Close() error {
	if b.p == nil {
		return nil
	}
	p := b.p
	b.p, b.buf = nil, nil
	return b.d.Do(func() error { return hostFree(p) })
}

// Pinned allocates n bytes of page-locked host memory (cuMemAllocHost).
func (d *Device) Pinned(n int) (*PinnedBuffer, error) {
	b := &PinnedBuffer{d: d}
	err := d.Do(func() error {
		p, err := hostAlloc(n)
		if err != nil {
			return err
		}
		b.p, b.buf = p, unsafe.Slice((*byte)(p), n)
		return nil
	})
	return b, err
}

// Upload copies src to dst and waits for the copy (Uploader). src should
// be pinned memory for DMA speed; pageable memory works too.
func (d *Device) Upload(ctx context.Context, dst DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.Do(func() error {
		if err := cu.MemcpyHtoDAsync(cu.DevicePtr(dst), unsafe.Pointer(&src[0]), int64(len(src)), d.stream); err != nil {
			return fmt.Errorf("cuMemcpyHtoDAsync %d bytes: %w", len(src), err)
		}
		return d.stream.Synchronize()
	})
}

// Download copies len(dst) bytes from src after the stream's pending work.
func (d *Device) Download(dst []byte, src DevicePtr) error {
	if len(dst) == 0 {
		return nil
	}
	return d.Do(func() error {
		if err := d.stream.Synchronize(); err != nil {
			return err
		}
		if err := cu.MemcpyDtoH(unsafe.Pointer(&dst[0]), cu.DevicePtr(src), int64(len(dst))); err != nil {
			return fmt.Errorf("cuMemcpyDtoH %d bytes: %w", len(dst), err)
		}
		return nil
	})
}

// CopyAsync enqueues a device-to-device copy on the stream.
func (d *Device) CopyAsync(dst, src DevicePtr, n uint64) error {
	return d.Do(func() error { return d.copyLocked(dst, src, n) })
}

// Sync waits for everything enqueued on the stream: the ordering point
// before a descriptor of the results is handed out.
func (d *Device) Sync() error {
	return d.Do(func() error { return d.stream.Synchronize() })
}

// Launch enqueues a kernel call on the stream.
func (d *Device) Launch(c Call) error { return d.launch(c) }

// launch enqueues a kernel call.
func (d *Device) launch(c Call) error {
	op, err := d.launchOp(c)
	if err != nil {
		return err
	}
	return d.Do(op)
}

// launchOp checks a call and returns it as an operation to run on the
// device thread.
func (d *Device) launchOp(c Call) (func() error, error) {
	fn, ok := d.fns[c.Kernel]
	if !ok {
		return nil, fmt.Errorf("kernel %s: not loaded", c.Kernel)
	}
	args := make([]uint64, len(c.Args))
	for i, a := range c.Args {
		args[i] = a.V
	}
	l := c.Launch
	return func() error {
		params := make([]unsafe.Pointer, len(args))
		for i := range args {
			params[i] = unsafe.Pointer(&args[i])
		}
		if err := fn.Launch(l.Grid, 1, 1, l.Block, 1, 1, l.Shared, d.stream, params); err != nil {
			return fmt.Errorf("launch %s (grid %d block %d shared %d): %w", c.Kernel, l.Grid, l.Block, l.Shared, err)
		}
		return nil
	}, nil
}

func (d *Device) copyLocked(dst, src DevicePtr, n uint64) error {
	if err := cu.MemcpyDtoDAsync(cu.DevicePtr(dst), cu.DevicePtr(src), int64(n), d.stream); err != nil {
		return fmt.Errorf("cuMemcpyDtoDAsync %d bytes: %w", n, err)
	}
	return nil
}

func (d *Device) copyAsync(dst, src DevicePtr, n uint64) error { return d.CopyAsync(dst, src, n) }

// OpenIPC maps another process's slab by its handle (the plugin side:
// open once per slab and cache).
func (d *Device) OpenIPC(h [HandleSize]byte) (DevicePtr, error) {
	var p DevicePtr
	err := d.Do(func() (err error) {
		p, err = ipcOpenMemHandle(h)
		return err
	})
	return p, err
}

// CloseIPC unmaps a slab opened with OpenIPC.
func (d *Device) CloseIPC(p DevicePtr) error {
	return d.Do(func() error {
		if err := d.stream.Synchronize(); err != nil {
			return err
		}
		return ipcCloseMemHandle(p)
	})
}

// memsetAsync zeroes n bytes at p on the stream; call on the device thread.
func memsetAsync(d *Device, p DevicePtr, n int64) error {
	return cu.MemsetD8Async(cu.DevicePtr(p), 0, n, d.stream)
}

// Zero enqueues zeroing n bytes at p.
func (d *Device) Zero(p DevicePtr, n uint64) error {
	return d.Do(func() error { return memsetAsync(d, p, int64(n)) })
}
