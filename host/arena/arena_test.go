package arena_test

import (
	"testing"

	"github.com/arenahost/arenahost/host/arena"
	"github.com/arenahost/arenahost/host/arena/arenatest"
)

func TestConformanceFakeDevice(t *testing.T) {
	arenatest.Run(t, func(t *testing.T) arena.Backend {
		d := arenatest.NewFakeDevice(0)
		t.Cleanup(func() {
			if n := d.Live(); n != 0 {
				t.Errorf("fake device: %d slabs leaked", n)
			}
		})
		return d
	})
}
