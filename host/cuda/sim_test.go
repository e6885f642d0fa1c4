//go:build linux

package cuda

import (
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
	"github.com/arenahost/arenahost/shared/gpu/gpusim"
)

// gpusim's device satisfies Device, as gpu.Device does in the cuda build.
var _ Device = (*gpusim.Device)(nil)

// TestConformanceSim runs the conformance suite, byte moves included, on
// the simulated GPU: memfd slabs, queued copies that run at Sync.
func TestConformanceSim(t *testing.T) {
	arenatest.Run(t, func(t *testing.T) arena.Backend {
		d := gpusim.NewCapacity(0, 64<<20)
		t.Cleanup(func() {
			if slabs, scratch, opened := d.Live(); slabs+scratch+opened != 0 {
				t.Errorf("simulated device: %d slabs, %d scratch, %d opened still live after the arena closed", slabs, scratch, opened)
			}
			if err := d.Close(); err != nil {
				t.Error(err)
			}
		})
		return NewBackend(d, nil)
	})
}
