package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
)

// Arena backends (Config.ArenaBackend).
const (
	BackendCPU     = "cpu"      // shared memory plugins map (memfd or /dev/shm)
	BackendCUDA    = "cuda"     // device memory, opened by plugins through CUDA IPC handles
	BackendCUDASim = "cuda-sim" // gpusim's simulated device: shared memory behind the device API
)

// device is a GPU the arena lives on: gpu.Device (cuda build) or gpusim's.
type device interface {
	cuda.Device
	Close() error
}

// The device backend is what the plugin manager tells about slab holders.
var _ plugin.SlabHolders = (*cuda.Backend)(nil)

// ErrNoCUDA: arena backend cuda in a build without the driver binding.
var ErrNoCUDA = errors.New("this arenahost was built without CUDA; build bin/cuda/arenahost with make cuda")

// newArena builds the arena cfg asks for. For a device backend it also
// returns the device (closed after the arena) and the backend (the slab
// holders the plugin manager reports to).
func newArena(ctx context.Context, cfg Config, log *slog.Logger) (*arena.Arena, *cuda.Backend, device, error) {
	acfg := arena.Config{Capacity: cfg.ArenaCapacity, SegmentSize: cfg.ArenaSegment, Logger: log}
	var dev device
	switch cfg.ArenaBackend {
	case "", BackendCPU:
		be, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUMode(cfg.ShmMode), Logger: log})
		if err != nil {
			return nil, nil, nil, fmt.Errorf("create arena backend: %w", err)
		}
		ar, err := arena.New(ctx, be, acfg)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("create arena: %w", err)
		}
		return ar, nil, nil, nil
	case BackendCUDA:
		d, err := openCUDA(cfg.ArenaDevice)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("arena backend %s on device %d: %w", cfg.ArenaBackend, cfg.ArenaDevice, err)
		}
		dev = d
	case BackendCUDASim:
		dev = gpusim.New(cfg.ArenaDevice)
	default:
		return nil, nil, nil, fmt.Errorf("arena backend %q: not %s, %s or %s", cfg.ArenaBackend, BackendCPU, BackendCUDA, BackendCUDASim)
	}
	ar, b, err := cuda.NewArenaNamed(ctx, cfg.ArenaBackend, dev, acfg)
	if err != nil {
		return nil, nil, nil, errors.Join(fmt.Errorf("create arena: %w", err), dev.Close())
	}
	log.Info("device arena", "backend", cfg.ArenaBackend, "device", cfg.ArenaDevice)
	return ar, b, dev, nil
}
