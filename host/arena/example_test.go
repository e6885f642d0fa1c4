//go:build linux

package arena_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/arenahost/arenahost/host/arena"
)

// A host leases regions to itself and to a plugin generation, binds the
// plugin's factors by transferring them, and reclaims the rest when the
// plugin dies.
func Example() {
	ctx := context.Background()
	quiet := slog.New(slog.DiscardHandler)
	b, err := arena.NewCPUBackend(arena.CPUConfig{Logger: quiet}) // memfd segments
	if err != nil {
		fmt.Println(err)
		return
	}
	a, err := arena.New(ctx, b, arena.Config{Capacity: 1 << 20, SegmentSize: 256 << 10, Logger: quiet})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer a.Close()

	w, _ := a.Alloc(arena.HostOwner, "double_blocks.0.img_attn.qkv.weight", 100_000)
	mem, err := a.Bytes(w) // the host's view; plugins map a.Location(w) at w.Offset
	if err != nil {
		fmt.Println(err)
		return
	}
	copy(mem, "packed nf4 codes")

	plugin := arena.PluginOwner("lora-nf4", 1)
	factors, _ := a.Alloc(plugin, "A_cat", 3000)
	scratch, _ := a.Alloc(plugin, "scratch", 5000)
	bound, _ := a.Transfer(factors, arena.HostOwner) // survives the plugin

	n, freed := a.ReleaseOwner(plugin) // the plugin generation died
	fmt.Println("reclaimed:", n, "regions,", freed)
	fmt.Println("scratch stale:", errors.Is(a.Check(scratch), arena.ErrStale))
	fmt.Println("bound factors live:", a.Check(bound) == nil)

	_, err = a.Alloc(plugin, "too big", 2<<20)
	fmt.Println("capacity error:", errors.Is(err, arena.ErrCapacity))

	st := a.Stats()
	fmt.Println("allocated:", st.Allocated, "in", st.Regions, "regions,", st.Segments, "segment")
	// Output:
	// reclaimed: 1 regions, 5.0 KiB
	// scratch stale: true
	// bound factors live: true
	// capacity error: true
	// allocated: 100.8 KiB in 2 regions, 1 segment
}
