// Package server owns the composition of the long-lived host: it builds the
// arena, the tensor registry and the plugin manager from one Config, connects
// them through small adapters (the plugin manager's Arena and Registry
// seams), writes the sample files on first run, and tears everything down in
// reverse order. The HTTP layer is built on top of a Server.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/cuda"
	"github.com/arenahost/arenahost/host/job"
	"github.com/arenahost/arenahost/host/lora"
	"github.com/arenahost/arenahost/host/plugin"
	"github.com/arenahost/arenahost/host/registry"
	"github.com/arenahost/arenahost/shared/safetensors"
	"github.com/arenahost/arenahost/shared/samples"
)

// Config configures a Server. Zero fields take the documented defaults.
type Config struct {
	// DataDir holds models/, loras/ and the samples written on first run.
	DataDir string
	// ModelsDir and LoRAsDir default to DataDir/models and DataDir/loras.
	ModelsDir string
	LoRAsDir  string
	// PluginsDir is scanned for DIR/NAME/plugin.json; empty: no plugins.
	PluginsDir string
	// ArenaCapacity bounds the arena (default 8 GiB of address space; the
	// memory is only committed as segments are written).
	ArenaCapacity uint64
	// ArenaSegment is the arena's growth unit (default 64 MiB).
	ArenaSegment uint64
	// LoRAJournalMemory bounds the host memory a fuse journal keeps
	// original bytes in (host/lora Coordinator.JournalMemory): 0, the zero
	// value, means the coordinator's default (auto); a negative value
	// none; a positive one a byte budget.
	LoRAJournalMemory int64
	// LoRAJournalArena is the arena budget for the same copies
	// (Coordinator.JournalArena; 0: none).
	LoRAJournalArena int64
	// LoRAFactorDType is the side factors' dtype when an apply names none
	// (Coordinator.FactorDType; "": f32).
	LoRAFactorDType string
	// ShmMode is "memfd" (default) or "shm" (files under /dev/shm).
	ShmMode string
	// ArenaBackend is "cpu" (default: shared memory), "cuda" (device
	// memory; only in a build with -tags cuda) or "cuda-sim" (gpusim's
	// simulated device); ArenaDevice is the device ordinal of the last two.
	ArenaBackend string
	ArenaDevice  int
	// Samples writes the sample model into ModelsDir when it has none and
	// loads it as the default model.
	Samples bool
	// PluginEnv is passed to manifest ${VAR} expansion (e.g. ARENAHOST_PYTHON).
	PluginEnv map[string]string
	Logger    *slog.Logger
	// LoadProgress, when set, is called as a model load starts with the
	// bytes to copy and a function reporting the bytes copied so far; it
	// returns the function to call when the load ends (the CLI's progress
	// bar).
	LoadProgress func(label string, total int64, done func() int64) (stop func())
}

// Defaults for Config.
const (
	DefaultArenaCapacity = 8 << 30
	DefaultModelName     = "sample"
	// PreviewArenaCapacity bounds the shared-memory arena of latent copies
	// beside a device arena (two copies per running job).
	PreviewArenaCapacity = 1 << 30
)

// Server is a running host: arena, registry and plugins.
type Server struct {
	cfg      Config
	log      *slog.Logger
	Arena    *arena.Arena
	Registry *registry.Registry
	Plugins  *plugin.Manager
	// Jobs runs pipeline jobs and receives what plugins publish.
	Jobs *job.Manager
	// Bindings holds the LoRA side factors bound to the models' weights;
	// LoRAs applies LoRA sets through the lora-nf4 plugin.
	Bindings *registry.Bindings
	LoRAs    *lora.Coordinator
	// Slabs is the device arena's backend (which plugin generation holds
	// which slab); nil for a CPU arena.
	Slabs *cuda.Backend
	// PreviewArena holds the latent copies previews render from when the
	// weights' arena is on the device (nil otherwise: one arena serves).
	PreviewArena *arena.Arena

	device device // the device a device arena lives on, closed after it

	// bg is cancelled by Close; prepares are the Prepare calls running.
	bg       context.Context
	stopBg   context.CancelFunc
	prepares sync.WaitGroup
}

// prepareTimeout bounds a background Prepare.
const prepareTimeout = 2 * time.Minute

// Prepare has the LoRA plugin open the device memory of a model just
// loaded into a device arena, in the background, so that the model's first
// fused apply does not wait for it (about 140 ms for Flux-dev on an H200).
// It does nothing for a CPU arena. A failure is only logged: the apply
// opens what is still closed and reports its errors.
func (s *Server) Prepare(model string) {
	if s.Slabs == nil || s.LoRAs == nil {
		return
	}
	s.prepares.Add(1)
	go func() {
		defer s.prepares.Done()
		ctx, cancel := context.WithTimeout(s.bg, prepareTimeout)
		defer cancel()
		t := time.Now()
		n, err := s.LoRAs.Prepare(ctx, model)
		if err != nil {
			s.log.Info("lora plugin did not prepare the model; its first fused apply opens the device memory itself", "model", model, "err", err)
			return
		}
		s.log.Debug("lora plugin opened the model's device memory", "model", model, "slabs", n, "took", time.Since(t))
	}()
}

// New builds a Server: it creates the arena, writes and loads the sample
// model when asked, and starts every plugin found in PluginsDir. On error
// everything already built is torn down.
func New(ctx context.Context, cfg Config) (_ *Server, err error) {
	cfg = withDefaults(cfg)
	log := cfg.Logger
	ar, slabs, dev, err := newArena(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, Arena: ar, Slabs: slabs, device: dev}
	s.bg, s.stopBg = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			_ = s.Close(context.WithoutCancel(ctx))
		}
	}()
	s.Registry = registry.New(ar, log)
	s.Bindings = registry.NewBindings(ar)
	for _, d := range []string{cfg.ModelsDir, cfg.LoRAsDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if cfg.Samples {
		if err := s.loadSample(ctx); err != nil {
			return nil, err
		}
	}
	mem := job.ArenaMemory(ar)
	if slabs != nil {
		// The preview plugin maps the latent copies it renders: they live
		// in a small shared-memory arena of their own; what pipelines
		// publish on the device is downloaded into it.
		be, err := arena.NewCPUBackend(arena.CPUConfig{Mode: arena.CPUMode(cfg.ShmMode), Logger: log})
		if err != nil {
			return nil, fmt.Errorf("create the preview arena: %w", err)
		}
		if s.PreviewArena, err = arena.New(ctx, be, arena.Config{Capacity: PreviewArenaCapacity, SegmentSize: 16 << 20, Logger: log}); err != nil {
			return nil, fmt.Errorf("create the preview arena: %w", err)
		}
		mem = job.SplitMemory(ar, s.PreviewArena)
	}
	s.Jobs = job.New(job.Config{Memory: mem, Logger: log})
	pcfg := plugin.Config{
		Dir:       cfg.PluginsDir,
		Env:       cfg.PluginEnv,
		ChildEnv:  DeviceEnv(cfg.ArenaBackend, cfg.ArenaDevice),
		Logger:    log,
		Arena:     plugin.ArenaOf(ar),
		Registry:  lookup{reg: s.Registry, loc: ar, bindings: s.Bindings},
		Publisher: s.Jobs,
	}
	if slabs != nil {
		pcfg.Slabs = slabs
	}
	s.Plugins = plugin.NewManager(pcfg)
	s.Jobs.Attach(s.Plugins)
	s.LoRAs = lora.New(s.Registry, s.Bindings, ar, s.Plugins, log)
	s.LoRAs.JournalArena = cfg.LoRAJournalArena
	s.LoRAs.FactorDType = cfg.LoRAFactorDType
	switch n := cfg.LoRAJournalMemory; {
	case n < 0:
		s.LoRAs.JournalMemory = 0
	case n > 0:
		s.LoRAs.JournalMemory = n
	}
	if cfg.PluginsDir != "" {
		// A plugin that does not start stays registered as failed, with
		// its error in /v1/plugins; the host serves the others.
		if err := s.Plugins.Load(ctx); err != nil {
			log.Warn("some plugins did not start", "dir", cfg.PluginsDir, "err", err)
		}
		if cfg.Samples {
			s.Prepare(DefaultModelName)
		}
	}
	return s, nil
}

func withDefaults(c Config) Config {
	if c.DataDir == "" {
		c.DataDir = "arenahost-data"
	}
	if c.ModelsDir == "" {
		c.ModelsDir = filepath.Join(c.DataDir, "models")
	}
	if c.LoRAsDir == "" {
		c.LoRAsDir = filepath.Join(c.DataDir, "loras")
	}
	if c.ArenaCapacity == 0 {
		c.ArenaCapacity = DefaultArenaCapacity
	}
	if c.ArenaBackend == "" {
		c.ArenaBackend = BackendCPU
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Config returns the configuration the server runs with, defaults filled in.
func (s *Server) Config() Config { return s.cfg }

// loadSample writes the sample model on first run and loads it.
func (s *Server) loadSample(ctx context.Context) error {
	path := filepath.Join(s.cfg.ModelsDir, samples.ModelFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		start := time.Now()
		if err := samples.WriteModel(path, samples.ModelOptions{Seed: 1}); err != nil {
			return err
		}
		s.log.Info("wrote sample model", "path", path, "took", time.Since(start).Round(time.Millisecond))
	}
	if _, err := os.Stat(filepath.Join(s.cfg.LoRAsDir, samples.KohyaLoRAFile)); errors.Is(err, os.ErrNotExist) {
		if err := samples.WriteLoRAs(s.cfg.LoRAsDir, 1); err != nil {
			return err
		}
		s.log.Info("wrote sample LoRAs", "dir", s.cfg.LoRAsDir, "files", []string{samples.KohyaLoRAFile, samples.PEFTLoRAFile})
	}
	if s.cfg.LoadProgress != nil {
		if st, err := os.Stat(path); err == nil {
			base := s.Arena.Stats().Allocated
			stop := s.cfg.LoadProgress("load "+samples.ModelFile, st.Size(), func() int64 {
				return int64(s.Arena.Stats().Allocated - base)
			})
			defer stop()
		}
	}
	m, err := s.Registry.Load(ctx, DefaultModelName, path, safetensors.Within(s.cfg.ModelsDir))
	if err != nil {
		return fmt.Errorf("load sample model: %w", err)
	}
	s.log.Info("loaded model", "model", m)
	return nil
}

// Close stops the plugins, unloads the models and closes the arena (which
// removes its shared-memory segments), then the device a device arena
// lived on.
func (s *Server) Close(ctx context.Context) error {
	var errs []error
	if s.stopBg != nil {
		s.stopBg()
		s.prepares.Wait()
	}
	if s.Jobs != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		errs = append(errs, s.Jobs.Close(cctx))
		cancel()
	}
	if s.Plugins != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		errs = append(errs, s.Plugins.Close(cctx))
		cancel()
	}
	if s.Registry != nil {
		for _, m := range s.Registry.Models() {
			errs = append(errs, s.Registry.Unload(m.Name))
		}
	}
	if s.PreviewArena != nil {
		errs = append(errs, s.PreviewArena.Close())
	}
	if s.Arena != nil {
		errs = append(errs, s.Arena.Close())
	}
	if s.device != nil {
		errs = append(errs, s.device.Close())
		s.device = nil
	}
	return errors.Join(errs...)
}
