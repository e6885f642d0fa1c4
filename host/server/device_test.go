package server

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/shared/gpu"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
	pluginv1 "github.com/arenahost/arenahost/shared/proto/arenahost/plugin/v1"
	"github.com/arenahost/arenahost/shared/samples"
)

// TestCUDASimServer runs the host on the simulated GPU: the sample model is
// streamed onto the device, LookupTensors hands out CUDA descriptors (the
// 4-bit weights' side tensors too), and Save writes the model back byte for
// byte from device memory.
func TestCUDASimServer(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := New(ctx, Config{DataDir: dir, Samples: true, ArenaBackend: BackendCUDASim, ArenaDevice: 1, ArenaCapacity: 256 << 20, Logger: quiet})
	if err != nil {
		t.Fatalf("New on cuda-sim: %v", err)
	}
	defer s.Close(ctx)
	if s.Slabs == nil || s.Arena.Mapped() {
		t.Fatalf("cuda-sim server: slab holders %v, host-mapped %v; want a device arena", s.Slabs, s.Arena.Mapped())
	}
	if st := s.Arena.Stats(); st.Backend != BackendCUDASim || st.Allocated == 0 {
		t.Fatalf("arena stats %+v: want backend cuda-sim holding the sample", st)
	}
	m, ok := s.Registry.Model(DefaultModelName)
	if !ok || len(m.Weights) != 42 {
		t.Fatalf("sample model not registered as expected: %+v", m)
	}

	resp, err := s.LookupTensors(ctx, &pluginv1.LookupTensorsRequest{Prefix: "double_blocks.0."})
	if err != nil {
		t.Fatal(err)
	}
	quant := 0
	for _, d := range resp.Tensors {
		regions := []*pluginv1.Region{d.GetRegion()}
		if q := d.GetQuant(); q != nil {
			quant++
			regions = append(regions, q.GetAbsmax().GetRegion(), q.GetQuantMap().GetRegion())
		}
		for _, r := range regions {
			loc, off, err := gpu.RegionAddr(r)
			if err != nil {
				t.Fatalf("%s: %v (want a CUDA descriptor)", d.GetName(), err)
			}
			if loc.Device != 1 || loc.HostPID != os.Getpid() || off+r.GetLength() > loc.Size {
				t.Fatalf("%s: slab %+v offset %d", d.GetName(), loc, off)
			}
		}
	}
	if len(resp.Tensors) == 0 || quant == 0 {
		t.Fatalf("lookup gave %d descriptors, %d of 4-bit weights", len(resp.Tensors), quant)
	}

	src := filepath.Join(dir, "models", samples.ModelFile)
	out := filepath.Join(t.TempDir(), "saved.safetensors")
	if err := s.Registry.Save(ctx, DefaultModelName, out); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("saved model (%d bytes) differs from %s (%d bytes)", len(got), src, len(want))
	}
	dev, ok := s.device.(*gpusim.Device)
	if !ok {
		t.Fatalf("device %T, want the simulated one", s.device)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := s.Arena.Alloc(arena.HostOwner, "x", 1); !errors.Is(err, arena.ErrClosed) {
		t.Fatalf("alloc after close: %v", err)
	}
	if slabs, scratch, _ := dev.Live(); slabs+scratch != 0 {
		t.Fatalf("after close the device still holds %d slabs and %d scratch buffers", slabs, scratch)
	}
	if _, err := dev.Alloc(4096); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("alloc on the device after the server closed: %v, want it closed", err)
	}
}

func TestArenaBackendErrors(t *testing.T) {
	tests := []struct {
		backend string
		want    string
	}{
		{"rocm", `arena backend "rocm": not cpu, cuda or cuda-sim`},
	}
	if noCUDA {
		tests = append(tests, struct{ backend, want string }{BackendCUDA, "built without CUDA; build bin/cuda/arenahost with make cuda"})
	}
	for _, tc := range tests {
		t.Run(tc.backend, func(t *testing.T) {
			_, err := New(context.Background(), Config{DataDir: t.TempDir(), ArenaBackend: tc.backend, ArenaCapacity: 16 << 20, Logger: quiet})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New with arena backend %q: %v, want %q", tc.backend, err, tc.want)
			}
		})
	}
}
