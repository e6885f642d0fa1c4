//go:build cuda

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/shared/gpu"
)

// checkLoad loads a file straight into an arena region on the device
// through a small pinned staging buffer (cuda.Loader) and reads it back.
func checkLoad(ctx context.Context, dev *gpu.Device, r *Report, log *slog.Logger) error {
	const size, staging = 256 << 20, 16 << 20
	dir, err := os.MkdirTemp("", "gpucheck")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := 0; i+8 <= len(data); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			data[i+k] = byte(v >> (8 * k))
		}
	}
	path := filepath.Join(dir, "tensor.bin")
	if err := os.WriteFile(path, append(make([]byte, 4096), data...), 0o600); err != nil {
		return err
	}
	a, backend, err := cuda.NewArena(ctx, dev, arena.Config{Capacity: 512 << 20, SegmentSize: 64 << 20, Logger: log})
	if err != nil {
		return err
	}
	defer a.Close()
	reg, err := a.Alloc(arena.HostOwner, "load-check", size)
	if err != nil {
		return err
	}
	pin, err := dev.Pinned(staging)
	if err != nil {
		return err
	}
	defer pin.Close()
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	l := &cuda.Loader{Backend: backend, Up: dev, Buf: pin.Bytes()}
	t0 := time.Now()
	if err := l.Load(ctx, reg, f, 4096); err != nil {
		return err
	}
	secs := time.Since(t0).Seconds()
	base, err := backend.Ptr(reg.Segment)
	if err != nil {
		return err
	}
	back := make([]byte, size)
	if err := dev.Download(back, base+gpu.DevicePtr(reg.Offset)); err != nil {
		return err
	}
	want, got := sha256.Sum256(data), sha256.Sum256(back)
	r.Check("load", fmt.Sprintf("file → device region through a %s pinned buffer", MiB(staging)),
		fmt.Sprintf("%s in %.3f s (%s), sha256 %s", MiB(size), secs, GBps(size, secs), map[bool]string{true: "equal", false: "DIFFERS"}[bytes.Equal(want[:], got[:])]),
		"bytes equal", want == got)
	return nil
}
